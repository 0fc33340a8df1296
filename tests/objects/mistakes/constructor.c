unsigned long hits;
__attribute__((constructor)) static void setup(void) { hits = 5; }
__attribute__((noinline)) unsigned long bump(unsigned long v) { hits += v; return hits; }
void textpoke_workload(void) { bump(1); }
