#include "textpoke.h"

struct pkt { unsigned char proto; unsigned short port; unsigned int len; unsigned char payload[24]; };

static struct pkt queue[4][16];
unsigned long verdicts[4][4];
DEFINE_STATIC_KEY_TRUE(filter_on);

int accept_all(const struct pkt *p) { return 0; }
int drop_telnet(const struct pkt *p) { return p->port == 23 ? 1 : 0; }
DEFINE_STATIC_CALL(filter, drop_telnet);

__attribute__((noinline)) int classify(const struct pkt *p)
{
	switch (p->proto) {
	case 1: return 0;
	case 6: return p->len > 1000 ? 2 : 1;
	case 17: return 3;
	case 41: return 2;
	case 58: return 1;
	default: return 3;
	}
}

__attribute__((noinline)) void make_pkt(struct pkt *out, unsigned long seed)
{
	struct pkt p = { .proto = (unsigned char)(seed % 64), .port = (unsigned short)(seed >> 8), .len = (unsigned int)seed };
	for (int i = 0; i < 24; i++)
		p.payload[i] = (unsigned char)(seed >> (i % 8));
	*out = p;
}

void textpoke_workload(void)
{
	unsigned long cpu = textpoke_cpu() & 3;
	static unsigned long n[4];
	struct pkt *slot = &queue[cpu][n[cpu]++ % 16];

	make_pkt(slot, n[cpu] * 0x9e3779b97f4a7c15ul);
	if (static_branch_likely(&filter_on) && static_call(filter)(slot))
		return;
	verdicts[cpu][classify(slot)]++;
}
