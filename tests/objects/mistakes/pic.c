unsigned long hits;
__attribute__((noinline)) unsigned long bump(unsigned long v) { hits += v; return hits; }
void textpoke_workload(void) { bump(1); }
