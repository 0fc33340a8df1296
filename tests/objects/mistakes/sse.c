struct pkt { unsigned long a, b, c, d; };
struct pkt table[4];
__attribute__((noinline)) void put(const struct pkt *p, unsigned i) { table[i & 3] = *p; }
void textpoke_workload(void) { struct pkt p = { 1, 2, 3, 4 }; put(&p, 1); }
