/*
 * The built-in kernel's workload and traced functions in C (`--kernel c`), compiled with the
 * kernel's flags by `textpoke cc --kernel` into kernel.o next to this file (BUILD.json says how).
 * It does what textpoke/asm/workload.S and traced.S do:
 *
 *   - 256 traced functions fn_000 .. fn_255, each a little arithmetic on its argument; the image
 *     builder keeps the ftrace sites of the first `nr_traced` (textpoke_nr_traced, which it sets);
 *   - the workload picks one with the per-CPU random number the loop publishes, counts the call in
 *     this CPU's own counters, calls it through the function table (a computed call, so the call
 *     graph does not see it), half the time with the stack 8 bytes off its ABI alignment (so int3
 *     frames land at both 16-byte alignments), then does a random amount of busy work on per-CPU
 *     memory;
 *   - the NMI handler calls one of the lower half of the first nmi_funcs functions on the NMI stack
 *     (textpoke_nmi) and one of the upper half on the irq stack (textpoke_nmi_irq), by direct calls,
 *     counting each call (at most 4 functions: the direct calls are what the call graph sees);
 *   - 8 static calls sc0 .. sc7 (the static-call client's sites), each retargetable among its 4
 *     targets sct_K_0 .. sct_K_3, which count their calls per CPU in PCPU_SC_COUNT; each iteration
 *     the workload also runs one static call: as a plain call site, as a tail call site (a
 *     wrapper whose only instruction is `jmp __SCT__scK`), or through the trampoline by a computed
 *     call (a caller the text patching does not reach, so that the trampoline is executed too).
 *
 *   - jump labels: fn_000 .. fn_063 each hold one static branch on their own key (textpoke_jl_keys[n],
 *     all off at boot), whose branch counts in this CPU's JL_TAKEN[n] every time the jmp is the
 *     instruction at the site. Most are static_branch_unlikely (a nop at boot, a jmp once the key is
 *     on); every eighth from n = 7 is static_branch_likely on the off key (a jmp at boot to the
 *     counting side, a nop once the key is on). The assembler picks the jmp's size: 2 bytes where
 *     the branch is near, 5 where it is not, as for every eighth from n = 1, whose branch calls a cold
 *     function and so lands in .text.unlikely (fn_NNN.cold); the loader turns the off ones into nops
 *     of the same size, as objtool does for Linux.
 *
 * The per-CPU offsets are textpoke.image.Percpu's (a test checks they agree).
 */
#include "textpoke.h"

#define PCPU_NMI_COUNT 0x08
#define PCPU_WORK_MASK 0x50
#define PCPU_RANDOM 0x78
#define PCPU_SCRATCH 0x200
#define PCPU_WL_COUNT 0x400
#define PCPU_NMI_CALLS 0x1c00
#define PCPU_JL_TAKEN 0x2c00
#define PCPU_SC_COUNT 0x2e00
#define PCPU_SC_RETURNS 0x2f00

#define NR_FUNCS 256
#define MAX_NMI_HALF 2
#define NR_KEYS 64
#define NR_SC 8
#define NR_SC_TARGETS 4

/* set by the image builder */
unsigned long textpoke_nr_traced = 32;
unsigned long textpoke_nmi_half = 2;
unsigned long textpoke_nr_sc = NR_SC;

static __always_inline notrace unsigned long percpu_read(unsigned long off)
{
	unsigned long v;

	asm volatile("movq %%gs:(%1), %0" : "=r"(v) : "r"(off) : "memory");
	return v;
}

static __always_inline notrace void percpu_write(unsigned long off, unsigned long v)
{
	asm volatile("movq %0, %%gs:(%1)" : : "r"(v), "r"(off) : "memory");
}

static __always_inline notrace void percpu_inc(unsigned long off)
{
	asm volatile("incq %%gs:(%0)" : : "r"(off) : "memory", "cc");
}

/* One static key per function that has a jump label (fn_000 .. fn_063), all off at boot. */
struct static_key_false textpoke_jl_keys[NR_KEYS];

/* The branch side of the cold jump labels: a cold function, so that the compiler moves the block
 * that calls it out of line into .text.unlikely, out of reach of a 2-byte jmp. */
__attribute__((cold, noinline)) notrace void jl_taken_cold(unsigned long n)
{
	percpu_inc(PCPU_JL_TAKEN + 8 * n);
}

#define JL_LIKELY(n) ((n) % 8 == 7)
#define JL_COLD(n) ((n) % 8 == 1)

/* Function n's jump label: JL_TAKEN[n] counts the executions that took the jmp. */
#define JUMP_LABEL(n)                                                           \
	do {                                                                    \
		if ((n) >= NR_KEYS)                                             \
			break;                                                  \
		if (JL_LIKELY(n)) {                                             \
			if (!static_branch_likely(&textpoke_jl_keys[(n) % NR_KEYS]))    \
				percpu_inc(PCPU_JL_TAKEN + 8 * (n));            \
		} else if (JL_COLD(n)) {                                        \
			if (static_branch_unlikely(&textpoke_jl_keys[(n) % NR_KEYS]))   \
				jl_taken_cold(n);                               \
		} else if (static_branch_unlikely(&textpoke_jl_keys[(n) % NR_KEYS])) { \
			percpu_inc(PCPU_JL_TAKEN + 8 * (n));                    \
		}                                                               \
	} while (0)

#define TRACED(name, n)                                                         \
	__attribute__((noinline)) unsigned long name(unsigned long x)           \
	{                                                                       \
		unsigned long y = x * (2 * (n) + 3) + (n);                      \
		JUMP_LABEL(n);                                                  \
		return (y >> 7) ^ y;                                            \
	}

TRACED(fn_000, 0)
TRACED(fn_001, 1)
TRACED(fn_002, 2)
TRACED(fn_003, 3)
TRACED(fn_004, 4)
TRACED(fn_005, 5)
TRACED(fn_006, 6)
TRACED(fn_007, 7)
TRACED(fn_008, 8)
TRACED(fn_009, 9)
TRACED(fn_010, 10)
TRACED(fn_011, 11)
TRACED(fn_012, 12)
TRACED(fn_013, 13)
TRACED(fn_014, 14)
TRACED(fn_015, 15)
TRACED(fn_016, 16)
TRACED(fn_017, 17)
TRACED(fn_018, 18)
TRACED(fn_019, 19)
TRACED(fn_020, 20)
TRACED(fn_021, 21)
TRACED(fn_022, 22)
TRACED(fn_023, 23)
TRACED(fn_024, 24)
TRACED(fn_025, 25)
TRACED(fn_026, 26)
TRACED(fn_027, 27)
TRACED(fn_028, 28)
TRACED(fn_029, 29)
TRACED(fn_030, 30)
TRACED(fn_031, 31)
TRACED(fn_032, 32)
TRACED(fn_033, 33)
TRACED(fn_034, 34)
TRACED(fn_035, 35)
TRACED(fn_036, 36)
TRACED(fn_037, 37)
TRACED(fn_038, 38)
TRACED(fn_039, 39)
TRACED(fn_040, 40)
TRACED(fn_041, 41)
TRACED(fn_042, 42)
TRACED(fn_043, 43)
TRACED(fn_044, 44)
TRACED(fn_045, 45)
TRACED(fn_046, 46)
TRACED(fn_047, 47)
TRACED(fn_048, 48)
TRACED(fn_049, 49)
TRACED(fn_050, 50)
TRACED(fn_051, 51)
TRACED(fn_052, 52)
TRACED(fn_053, 53)
TRACED(fn_054, 54)
TRACED(fn_055, 55)
TRACED(fn_056, 56)
TRACED(fn_057, 57)
TRACED(fn_058, 58)
TRACED(fn_059, 59)
TRACED(fn_060, 60)
TRACED(fn_061, 61)
TRACED(fn_062, 62)
TRACED(fn_063, 63)
TRACED(fn_064, 64)
TRACED(fn_065, 65)
TRACED(fn_066, 66)
TRACED(fn_067, 67)
TRACED(fn_068, 68)
TRACED(fn_069, 69)
TRACED(fn_070, 70)
TRACED(fn_071, 71)
TRACED(fn_072, 72)
TRACED(fn_073, 73)
TRACED(fn_074, 74)
TRACED(fn_075, 75)
TRACED(fn_076, 76)
TRACED(fn_077, 77)
TRACED(fn_078, 78)
TRACED(fn_079, 79)
TRACED(fn_080, 80)
TRACED(fn_081, 81)
TRACED(fn_082, 82)
TRACED(fn_083, 83)
TRACED(fn_084, 84)
TRACED(fn_085, 85)
TRACED(fn_086, 86)
TRACED(fn_087, 87)
TRACED(fn_088, 88)
TRACED(fn_089, 89)
TRACED(fn_090, 90)
TRACED(fn_091, 91)
TRACED(fn_092, 92)
TRACED(fn_093, 93)
TRACED(fn_094, 94)
TRACED(fn_095, 95)
TRACED(fn_096, 96)
TRACED(fn_097, 97)
TRACED(fn_098, 98)
TRACED(fn_099, 99)
TRACED(fn_100, 100)
TRACED(fn_101, 101)
TRACED(fn_102, 102)
TRACED(fn_103, 103)
TRACED(fn_104, 104)
TRACED(fn_105, 105)
TRACED(fn_106, 106)
TRACED(fn_107, 107)
TRACED(fn_108, 108)
TRACED(fn_109, 109)
TRACED(fn_110, 110)
TRACED(fn_111, 111)
TRACED(fn_112, 112)
TRACED(fn_113, 113)
TRACED(fn_114, 114)
TRACED(fn_115, 115)
TRACED(fn_116, 116)
TRACED(fn_117, 117)
TRACED(fn_118, 118)
TRACED(fn_119, 119)
TRACED(fn_120, 120)
TRACED(fn_121, 121)
TRACED(fn_122, 122)
TRACED(fn_123, 123)
TRACED(fn_124, 124)
TRACED(fn_125, 125)
TRACED(fn_126, 126)
TRACED(fn_127, 127)
TRACED(fn_128, 128)
TRACED(fn_129, 129)
TRACED(fn_130, 130)
TRACED(fn_131, 131)
TRACED(fn_132, 132)
TRACED(fn_133, 133)
TRACED(fn_134, 134)
TRACED(fn_135, 135)
TRACED(fn_136, 136)
TRACED(fn_137, 137)
TRACED(fn_138, 138)
TRACED(fn_139, 139)
TRACED(fn_140, 140)
TRACED(fn_141, 141)
TRACED(fn_142, 142)
TRACED(fn_143, 143)
TRACED(fn_144, 144)
TRACED(fn_145, 145)
TRACED(fn_146, 146)
TRACED(fn_147, 147)
TRACED(fn_148, 148)
TRACED(fn_149, 149)
TRACED(fn_150, 150)
TRACED(fn_151, 151)
TRACED(fn_152, 152)
TRACED(fn_153, 153)
TRACED(fn_154, 154)
TRACED(fn_155, 155)
TRACED(fn_156, 156)
TRACED(fn_157, 157)
TRACED(fn_158, 158)
TRACED(fn_159, 159)
TRACED(fn_160, 160)
TRACED(fn_161, 161)
TRACED(fn_162, 162)
TRACED(fn_163, 163)
TRACED(fn_164, 164)
TRACED(fn_165, 165)
TRACED(fn_166, 166)
TRACED(fn_167, 167)
TRACED(fn_168, 168)
TRACED(fn_169, 169)
TRACED(fn_170, 170)
TRACED(fn_171, 171)
TRACED(fn_172, 172)
TRACED(fn_173, 173)
TRACED(fn_174, 174)
TRACED(fn_175, 175)
TRACED(fn_176, 176)
TRACED(fn_177, 177)
TRACED(fn_178, 178)
TRACED(fn_179, 179)
TRACED(fn_180, 180)
TRACED(fn_181, 181)
TRACED(fn_182, 182)
TRACED(fn_183, 183)
TRACED(fn_184, 184)
TRACED(fn_185, 185)
TRACED(fn_186, 186)
TRACED(fn_187, 187)
TRACED(fn_188, 188)
TRACED(fn_189, 189)
TRACED(fn_190, 190)
TRACED(fn_191, 191)
TRACED(fn_192, 192)
TRACED(fn_193, 193)
TRACED(fn_194, 194)
TRACED(fn_195, 195)
TRACED(fn_196, 196)
TRACED(fn_197, 197)
TRACED(fn_198, 198)
TRACED(fn_199, 199)
TRACED(fn_200, 200)
TRACED(fn_201, 201)
TRACED(fn_202, 202)
TRACED(fn_203, 203)
TRACED(fn_204, 204)
TRACED(fn_205, 205)
TRACED(fn_206, 206)
TRACED(fn_207, 207)
TRACED(fn_208, 208)
TRACED(fn_209, 209)
TRACED(fn_210, 210)
TRACED(fn_211, 211)
TRACED(fn_212, 212)
TRACED(fn_213, 213)
TRACED(fn_214, 214)
TRACED(fn_215, 215)
TRACED(fn_216, 216)
TRACED(fn_217, 217)
TRACED(fn_218, 218)
TRACED(fn_219, 219)
TRACED(fn_220, 220)
TRACED(fn_221, 221)
TRACED(fn_222, 222)
TRACED(fn_223, 223)
TRACED(fn_224, 224)
TRACED(fn_225, 225)
TRACED(fn_226, 226)
TRACED(fn_227, 227)
TRACED(fn_228, 228)
TRACED(fn_229, 229)
TRACED(fn_230, 230)
TRACED(fn_231, 231)
TRACED(fn_232, 232)
TRACED(fn_233, 233)
TRACED(fn_234, 234)
TRACED(fn_235, 235)
TRACED(fn_236, 236)
TRACED(fn_237, 237)
TRACED(fn_238, 238)
TRACED(fn_239, 239)
TRACED(fn_240, 240)
TRACED(fn_241, 241)
TRACED(fn_242, 242)
TRACED(fn_243, 243)
TRACED(fn_244, 244)
TRACED(fn_245, 245)
TRACED(fn_246, 246)
TRACED(fn_247, 247)
TRACED(fn_248, 248)
TRACED(fn_249, 249)
TRACED(fn_250, 250)
TRACED(fn_251, 251)
TRACED(fn_252, 252)
TRACED(fn_253, 253)
TRACED(fn_254, 254)
TRACED(fn_255, 255)

typedef unsigned long (*traced_fn)(unsigned long);

static traced_fn const traced[NR_FUNCS] = {
	fn_000, fn_001, fn_002, fn_003, fn_004, fn_005, fn_006, fn_007,
	fn_008, fn_009, fn_010, fn_011, fn_012, fn_013, fn_014, fn_015,
	fn_016, fn_017, fn_018, fn_019, fn_020, fn_021, fn_022, fn_023,
	fn_024, fn_025, fn_026, fn_027, fn_028, fn_029, fn_030, fn_031,
	fn_032, fn_033, fn_034, fn_035, fn_036, fn_037, fn_038, fn_039,
	fn_040, fn_041, fn_042, fn_043, fn_044, fn_045, fn_046, fn_047,
	fn_048, fn_049, fn_050, fn_051, fn_052, fn_053, fn_054, fn_055,
	fn_056, fn_057, fn_058, fn_059, fn_060, fn_061, fn_062, fn_063,
	fn_064, fn_065, fn_066, fn_067, fn_068, fn_069, fn_070, fn_071,
	fn_072, fn_073, fn_074, fn_075, fn_076, fn_077, fn_078, fn_079,
	fn_080, fn_081, fn_082, fn_083, fn_084, fn_085, fn_086, fn_087,
	fn_088, fn_089, fn_090, fn_091, fn_092, fn_093, fn_094, fn_095,
	fn_096, fn_097, fn_098, fn_099, fn_100, fn_101, fn_102, fn_103,
	fn_104, fn_105, fn_106, fn_107, fn_108, fn_109, fn_110, fn_111,
	fn_112, fn_113, fn_114, fn_115, fn_116, fn_117, fn_118, fn_119,
	fn_120, fn_121, fn_122, fn_123, fn_124, fn_125, fn_126, fn_127,
	fn_128, fn_129, fn_130, fn_131, fn_132, fn_133, fn_134, fn_135,
	fn_136, fn_137, fn_138, fn_139, fn_140, fn_141, fn_142, fn_143,
	fn_144, fn_145, fn_146, fn_147, fn_148, fn_149, fn_150, fn_151,
	fn_152, fn_153, fn_154, fn_155, fn_156, fn_157, fn_158, fn_159,
	fn_160, fn_161, fn_162, fn_163, fn_164, fn_165, fn_166, fn_167,
	fn_168, fn_169, fn_170, fn_171, fn_172, fn_173, fn_174, fn_175,
	fn_176, fn_177, fn_178, fn_179, fn_180, fn_181, fn_182, fn_183,
	fn_184, fn_185, fn_186, fn_187, fn_188, fn_189, fn_190, fn_191,
	fn_192, fn_193, fn_194, fn_195, fn_196, fn_197, fn_198, fn_199,
	fn_200, fn_201, fn_202, fn_203, fn_204, fn_205, fn_206, fn_207,
	fn_208, fn_209, fn_210, fn_211, fn_212, fn_213, fn_214, fn_215,
	fn_216, fn_217, fn_218, fn_219, fn_220, fn_221, fn_222, fn_223,
	fn_224, fn_225, fn_226, fn_227, fn_228, fn_229, fn_230, fn_231,
	fn_232, fn_233, fn_234, fn_235, fn_236, fn_237, fn_238, fn_239,
	fn_240, fn_241, fn_242, fn_243, fn_244, fn_245, fn_246, fn_247,
	fn_248, fn_249, fn_250, fn_251, fn_252, fn_253, fn_254, fn_255,
};

/* A computed call with the stack 8 bytes below its ABI alignment: the callee's frames, and an int3's
 * frame on top of them, land at the other 16-byte alignment. */
static __always_inline notrace unsigned long call_misaligned(traced_fn fn, unsigned long arg)
{
	unsigned long ret;

	asm volatile("sub $8, %%rsp\n\t"
		     "call *%[fn]\n\t"
		     "add $8, %%rsp"
		     : "=a"(ret), "+D"(arg)
		     : [fn] "b"(fn)
		     : "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "memory", "cc");
	return ret;
}


/* ---- static calls ------------------------------------------------------------------------------ */
#define SC_TARGET(k, j)                                                                 \
	__attribute__((noinline)) notrace void sct_##k##_##j(void)                    \
	{                                                                              \
		percpu_inc(PCPU_SC_COUNT + 8 * ((k) * NR_SC_TARGETS + (j)));           \
	}
#define SC_TARGETS(k) SC_TARGET(k, 0) SC_TARGET(k, 1) SC_TARGET(k, 2) SC_TARGET(k, 3)

SC_TARGETS(0)
SC_TARGETS(1)
SC_TARGETS(2)
SC_TARGETS(3)
SC_TARGETS(4)
SC_TARGETS(5)
SC_TARGETS(6)
SC_TARGETS(7)

DEFINE_STATIC_CALL(sc0, sct_0_0);
DEFINE_STATIC_CALL(sc1, sct_1_0);
DEFINE_STATIC_CALL(sc2, sct_2_0);
DEFINE_STATIC_CALL(sc3, sct_3_0);
DEFINE_STATIC_CALL(sc4, sct_4_0);
DEFINE_STATIC_CALL(sc5, sct_5_0);
DEFINE_STATIC_CALL(sc6, sct_6_0);
DEFINE_STATIC_CALL(sc7, sct_7_0);

/* A tail call site: the wrapper's only instruction is `jmp __SCT__scK`. */
#define SC_TAIL(k)                                                                      \
	__attribute__((noinline)) notrace void sc_tail_##k(void)                      \
	{                                                                              \
		static_call(sc##k)();                                                  \
	}
SC_TAIL(0)
SC_TAIL(1)
SC_TAIL(2)
SC_TAIL(3)
SC_TAIL(4)
SC_TAIL(5)
SC_TAIL(6)
SC_TAIL(7)

typedef void (*sc_fn)(void);

/* The trampolines by address: a computed call reaches them whatever the call sites say. */
static sc_fn const sc_trampolines[NR_SC] = {
	__SCT__sc0, __SCT__sc1, __SCT__sc2, __SCT__sc3, __SCT__sc4, __SCT__sc5, __SCT__sc6, __SCT__sc7,
};
static sc_fn const sc_tails[NR_SC] = {
	sc_tail_0, sc_tail_1, sc_tail_2, sc_tail_3, sc_tail_4, sc_tail_5, sc_tail_6, sc_tail_7,
};

/* One static call of the first `textpoke_nr_sc`, picked by `r`: a call site (half the time), a
 * tail call site or the trampoline. A call site's returns are counted per static call in
 * PCPU_SC_RETURNS (each case is reached by the switch's computed jump: a block starts at it). */
static __attribute__((noinline)) notrace void static_calls(unsigned long r)
{
	unsigned long k = ((r >> 8) & 0xffff) * textpoke_nr_sc >> 16;
	unsigned long how = (r >> 24) & 3;

	if (how == 2) {
		sc_tails[k]();
		return;
	}
	if (how == 3) {
		sc_trampolines[k]();
		return;
	}
	switch (k) {
	case 0: static_call(sc0)(); break;
	case 1: static_call(sc1)(); break;
	case 2: static_call(sc2)(); break;
	case 3: static_call(sc3)(); break;
	case 4: static_call(sc4)(); break;
	case 5: static_call(sc5)(); break;
	case 6: static_call(sc6)(); break;
	case 7: static_call(sc7)(); break;
	}
	/* after the call returns: so the site is a call, not a tail jump */
	percpu_inc(PCPU_SC_RETURNS + 8 * k);
}

notrace void textpoke_workload(void)
{
	unsigned long r = percpu_read(PCPU_RANDOM);
	unsigned long i = ((r >> 32) * textpoke_nr_traced) >> 32;
	unsigned long acc;

	percpu_inc(PCPU_WL_COUNT + 8 * i);
	if (r & (1ul << 40))
		acc = call_misaligned(traced[i], r);
	else
		acc = traced[i](r);
	static_calls(r);
	for (unsigned long n = (r >> 48) & percpu_read(PCPU_WORK_MASK); n; n--) {
		unsigned long v = percpu_read(PCPU_SCRATCH + 8 * n) + acc;

		percpu_write(PCPU_SCRATCH + 8 * n, v);
		acc ^= v;
	}
}

/* Where the NMI's calls leave their results: the traced functions have no side effects, and a call
 * whose result nobody uses would be dropped by the compiler. */
unsigned long nmi_sink;

/* The k-th function of the NMI's set, by a direct call (k < 2 * MAX_NMI_HALF). */
static notrace void nmi_call(unsigned long k)
{
	percpu_inc(PCPU_NMI_CALLS + 8 * k);
	switch (k) {
	case 0: nmi_sink ^= fn_000(k); break;
	case 1: nmi_sink ^= fn_001(k); break;
	case 2: nmi_sink ^= fn_002(k); break;
	case 3: nmi_sink ^= fn_003(k); break;
	}
}

/* On the NMI stack: one of the lower half. */
notrace void textpoke_nmi(void)
{
	nmi_call(percpu_read(PCPU_NMI_COUNT) & (textpoke_nmi_half - 1));
}

/* On the irq stack: one of the upper half. */
notrace void textpoke_nmi_irq(void)
{
	nmi_call(textpoke_nmi_half + (percpu_read(PCPU_NMI_COUNT) & (textpoke_nmi_half - 1)));
}
