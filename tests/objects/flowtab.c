/*
 * A flow table, as a new user of `--object` would write one: each workload CPU hashes a 5-tuple
 * derived from its random number, looks it up in a shared open-addressing table, inserts it when
 * missing and bumps its counters. The `flow_trace` static key turns on per-CPU tracing of misses;
 * the hash function is reached through a static call. The NMI handler counts the table's load.
 */
#include "textpoke.h"

#define BUCKETS 256
#define NCPU 8

struct flow_key {
	unsigned int saddr, daddr;
	unsigned short sport, dport;
	unsigned char proto;
};

struct flow {
	struct flow_key key;
	unsigned long packets;
	unsigned long bytes;
	int used;
};

static struct flow table[BUCKETS];
unsigned long flow_misses[NCPU];
unsigned long flow_traced[NCPU];
unsigned long flow_collisions;
unsigned long nmi_load;
static const unsigned int proto_weight[4] = { 6, 17, 1, 58 };

DEFINE_STATIC_KEY_FALSE(flow_trace);

__attribute__((noinline)) unsigned int flow_hash_jhash(const struct flow_key *k)
{
	unsigned int h = k->saddr * 0x9e3779b1u;

	h ^= k->daddr + 0x7f4a7c15u + (h << 6) + (h >> 2);
	h ^= ((unsigned int)k->sport << 16 | k->dport) * 0x85ebca6bu;
	h ^= k->proto;
	return h ^ (h >> 15);
}

DEFINE_STATIC_CALL(flow_hash, flow_hash_jhash);

__attribute__((noinline)) static int key_eq(const struct flow_key *a, const struct flow_key *b)
{
	return a->saddr == b->saddr && a->daddr == b->daddr && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto;
}

__attribute__((noinline)) struct flow *flow_lookup(const struct flow_key *k, unsigned int h)
{
	for (unsigned int i = 0; i < 4; i++) {
		struct flow *f = &table[(h + i) % BUCKETS];

		if (f->used && key_eq(&f->key, k))
			return f;
		if (!f->used)
			return 0;
	}
	return 0;
}

__attribute__((noinline)) struct flow *flow_insert(const struct flow_key *k, unsigned int h)
{
	struct flow *f = &table[h % BUCKETS];

	if (f->used)
		flow_collisions++;
	f->key = *k;
	f->packets = 0;
	f->bytes = 0;
	f->used = 1;
	return f;
}

__attribute__((noinline)) void flow_trace_miss(unsigned long cpu, unsigned int h)
{
	flow_traced[cpu] += h & 0xff;
}

void textpoke_workload(void)
{
	unsigned long cpu = textpoke_cpu() & (NCPU - 1);
	unsigned long r = textpoke_random();
	struct flow_key k = {
		.saddr = 0x0a000000u | (r & 0x3f),
		.daddr = 0xc0a80001u,
		.sport = (unsigned short)(1024 + ((r >> 8) & 7)),
		.dport = 443,
		.proto = (unsigned char)proto_weight[(r >> 16) & 3],
	};
	unsigned int h = static_call(flow_hash)(&k);
	struct flow *f = flow_lookup(&k, h);

	if (!f) {
		flow_misses[cpu]++;
		if (static_branch_unlikely(&flow_trace))
			flow_trace_miss(cpu, h);
		f = flow_insert(&k, h);
	}
	f->packets++;
	f->bytes += 64 + (r & 0x3ff);
}

void textpoke_nmi(void)
{
	unsigned long used = 0;

	for (int i = 0; i < 16; i++)
		used += table[i].used;
	nmi_load += used;
}
