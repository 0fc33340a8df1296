/*
 * textpoke.h - the runtime a C object loaded with `textpoke ... --object FILE.o` may use.
 *
 * The contract:
 *   - every workload CPU calls `void textpoke_workload(void)` in a loop; it should return (one
 *     iteration of work), so that runs can end at an iteration boundary;
 *   - the NMI handler calls `void textpoke_nmi(void)` if an object defines it (on the 4 KiB NMI
 *     stack, with NMIs blocked: keep it short), then `void textpoke_nmi_irq(void)` if defined, on
 *     this CPU's 16 KiB irq stack;
 *   - every function compiled with -pg -mfentry gets an ftrace site, which the protocols patch;
 *     `notrace` functions get none;
 *   - data (.data, .bss, .rodata) is shared by all CPUs; textpoke_cpu() says which CPU runs,
 *     textpoke_random() gives a per-iteration random number;
 *   - a traced function without side effects whose result is unused may be dropped by the
 *     compiler, call and all: use its result;
 *   - the kernel provides memcpy, memset and memmove; any other undefined symbol is an error.
 *
 * Compile with the kernel's flags, e.g.
 *   gcc -O2 -pg -mfentry -mrecord-mcount -mnop-mcount -mcmodel=kernel -fno-pic -mno-red-zone \
 *       -ffreestanding -fno-stack-protector -mgeneral-regs-only -c file.c
 *   python -m ziglang cc -target x86_64-freestanding-none -O2 -pg -mfentry -mcmodel=kernel \
 *       -fno-pic -mno-red-zone -mno-sse -mno-mmx -mno-sse2 -mno-avx -c file.c
 * (clang and zig cc take -mgeneral-regs-only but still copy structs through %xmm on x86)
 * or let `textpoke cc file.c -o DIR` pick the compiler and the flags.
 */
#ifndef TEXTPOKE_H
#define TEXTPOKE_H

#define notrace __attribute__((no_instrument_function))
#define __always_inline inline __attribute__((always_inline))

/* The per-CPU area is addressed through %gs; its first word is the CPU number. */
static __always_inline notrace unsigned long textpoke_cpu(void)
{
	unsigned long cpu;

	asm volatile("movq %%gs:0, %0" : "=r"(cpu));
	return cpu;
}

/* A random number per workload iteration and CPU (the workload loop's LCG, seeded from the run's
 * seed and the CPU number, so runs stay deterministic). Valid in textpoke_workload. */
static __always_inline notrace unsigned long textpoke_random(void)
{
	unsigned long r;

	asm volatile("movq %%gs:0x78, %0" : "=r"(r));
	return r;
}

/* ---------------------------------------------------------------------------------------------
 * Static keys (jump labels). A static_branch_*() test compiles to one `jmp` to the branch, which
 * the assembler encodes in 2 bytes (eb rel8) when the branch is within reach and in 5 (e9 rel32)
 * otherwise, and records where that instruction is in the `__jump_table` section, so the kernel can
 * switch it by patching the text. A branch that is off by default is marked in its entry (key bit
 * 1), and the loader turns its jmp into a nop of the same size (66 90, or 0f 1f 44 00 00), as
 * Linux's objtool does at build time. Each entry holds three values, each relative to its own
 * field, as Linux's x86 entries do:
 *   s32 code   - the 2- or 5-byte instruction
 *   s32 target - where it jumps when the branch is on
 *   s64 key    - the struct static_key; bit 0 says the branch is taken by default
 *                (static_branch_likely), bit 1 asks the loader to make the jmp a nop
 * Entries of older objects whose instruction is already the 5-byte nop (no bit 1) load as they are.
 * ------------------------------------------------------------------------------------------- */
struct static_key {
	int enabled;
};
struct static_key_true {
	struct static_key key;
};
struct static_key_false {
	struct static_key key;
};

#define DEFINE_STATIC_KEY_TRUE(name) struct static_key_true name = { .key = { .enabled = 1 } }
#define DEFINE_STATIC_KEY_FALSE(name) struct static_key_false name = { .key = { .enabled = 0 } }

/* The instruction is a nop once loaded: returns 1 only once the text is patched to the jmp. */
static __always_inline notrace int __textpoke_branch_nop(struct static_key *const key, const int branch)
{
	asm goto("1: jmp %l[yes]\n\t"
		 ".pushsection __jump_table, \"aw\"\n\t"
		 ".balign 8\n\t"
		 ".long 1b - ., %l[yes] - .\n\t"
		 ".quad %c0 + %c1 + 2 - .\n\t"
		 ".popsection"
		 : : "i"(key), "i"(branch) : : yes);
	return 0;
yes:
	return 1;
}

/* The instruction is a jmp at build time: returns 1 until the text is patched to the nop. */
static __always_inline notrace int __textpoke_branch_jmp(struct static_key *const key, const int branch)
{
	asm goto("1: jmp %l[yes]\n\t"
		 ".pushsection __jump_table, \"aw\"\n\t"
		 ".balign 8\n\t"
		 ".long 1b - ., %l[yes] - .\n\t"
		 ".quad %c0 + %c1 - .\n\t"
		 ".popsection"
		 : : "i"(key), "i"(branch) : : yes);
	return 0;
yes:
	return 1;
}

/* As in Linux: the out-of-line side is the one the key's default does not take. */
#define static_branch_unlikely(x)                                                       \
	(__builtin_types_compatible_p(__typeof__(*(x)), struct static_key_true)           \
		 ? __textpoke_branch_jmp(&(x)->key, 0)                                     \
		 : __textpoke_branch_nop(&(x)->key, 0))
#define static_branch_likely(x)                                                         \
	(__builtin_types_compatible_p(__typeof__(*(x)), struct static_key_true)           \
		 ? !__textpoke_branch_nop(&(x)->key, 1)                                    \
		 : !__textpoke_branch_jmp(&(x)->key, 1))

/* ---------------------------------------------------------------------------------------------
 * Static calls. DEFINE_STATIC_CALL(name, target) defines the key `__SCK__name` and the trampoline
 * `__SCT__name` (a 5-byte `jmp target`, then a ud2 that is never reached); static_call(name)(args) calls the
 * trampoline. The loader records every call or tail jump to a `__SCT__` trampoline as a static call
 * site (what Linux's objtool writes into .static_call_sites); objects may also carry that section
 * themselves: entries of two s32, each relative to its own field: the call instruction, and the key
 * (bit 0: a tail call, bit 1: init code). `target` must be a global function.
 * ------------------------------------------------------------------------------------------- */
struct static_call_key {
	void *func;
};

#define __TEXTPOKE_STR(x) #x
#define DEFINE_STATIC_CALL(name, target)                                                           \
	struct static_call_key __SCK__##name = { .func = (void *)(target) };                         \
	asm(".pushsection .static_call.text, \"ax\"\n\t"                                          \
	    ".balign 8\n\t"                                                                           \
	    ".globl __SCT__" #name "\n\t"                                                             \
	    ".type __SCT__" #name ", @function\n"                                                     \
	    "__SCT__" #name ":\n\t"                                                                   \
	    ".byte 0xe9\n\t"                                                                          \
	    ".long " __TEXTPOKE_STR(target) " - (. + 4)\n\t"                                            \
	    "ud2\n\t"                                                                                 \
	    ".size __SCT__" #name ", . - __SCT__" #name "\n\t"                                        \
	    ".popsection");                                                                           \
	extern __typeof__(target) __SCT__##name

#define static_call(name) (__SCT__##name)

#endif /* TEXTPOKE_H */
