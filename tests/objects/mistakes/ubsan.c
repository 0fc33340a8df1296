int vals[8];
__attribute__((noinline)) int get(int i, int s) { return vals[i] << s; }
int out;
void textpoke_workload(void) { out = get(1, 2); }
