/*
 * A small test kernel module for `--object`: each workload CPU pushes values through its own slot
 * of a shared ring, checksums them and, when the `ring_stats` static key is on, keeps statistics.
 * The NMI handler samples the ring.
 */
#include "textpoke.h"

#define SLOTS 64

struct ring {
	unsigned long head;
	unsigned long vals[SLOTS];
};

static struct ring rings[8];
unsigned long ring_sum[8];
unsigned long ring_max[8];
unsigned long nmi_samples;

DEFINE_STATIC_KEY_FALSE(ring_stats);

__attribute__((noinline)) unsigned long ring_push(struct ring *r, unsigned long v)
{
	r->vals[r->head % SLOTS] = v;
	r->head++;
	return r->head;
}

__attribute__((noinline)) unsigned long ring_checksum(const struct ring *r)
{
	unsigned long sum = 0;

	for (int i = 0; i < 8; i++)
		sum = (sum << 3) ^ r->vals[(r->head - 1 - i) % SLOTS];
	return sum;
}

__attribute__((noinline)) void ring_account(unsigned long cpu, unsigned long sum)
{
	ring_sum[cpu] += sum;
	if (sum > ring_max[cpu])
		ring_max[cpu] = sum;
}

void textpoke_workload(void)
{
	unsigned long cpu = textpoke_cpu() & 7;
	struct ring *r = &rings[cpu];
	unsigned long n = ring_push(r, r->head * 2654435761u + cpu);

	if (static_branch_unlikely(&ring_stats))
		ring_account(cpu, ring_checksum(r));
	else if ((n & 3) == 0)
		ring_account(cpu, n);
}

void textpoke_nmi(void)
{
	nmi_samples += ring_checksum(&rings[textpoke_cpu() & 7]) & 1;
}
