__attribute__((noinline)) unsigned long fill(unsigned long v)
{ char buf[64]; for (int i = 0; i < 64; i++) buf[i] = v + i; return buf[v & 63]; }
unsigned long out;
void textpoke_workload(void) { out = fill(1); }
