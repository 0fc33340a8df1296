# The kprobe side of the #BP handler chain, and the executable areas kprobes copy instructions into.
#
# `kprobe_table` (kernel data): nr u64 (entries in use, a high-water mark), a u64 of padding, then
# KPROBE_MAX entries of 32 bytes: address u64 (0: a free entry), resume u64, length u8, index u8.
# The patcher fills an entry before it writes the probe's int3 and clears it only after the original
# byte is back and every CPU has synced; it frees the out-of-line slot only after a grace period.
#
# On a hit the probe's callback runs (it counts the hit per CPU and per probe index), then the CPU
# continues at `resume`: a boosted out-of-line slot (the displaced instruction, then a jmp back to the
# next one) or, for an optimized probe, the copied instructions of its detour buffer.

# rdi -> orig_ax of the #BP frame (RIP at +8). Returns rax = 1 when the trap was handled here.
# Touches rax, rcx, rdx, r8 only, and calls nothing.
SYM_FUNC_START(kprobe_int3_handler)
    mov rdx, qword ptr [rdi+8]
    dec rdx                             # the address of the int3
    mov r8, KPROBE_TABLE
    mov rcx, qword ptr [r8]             # entries in use
    add r8, 16
.Lnext:
    test rcx, rcx
    jz .Lnobody
    cmp qword ptr [r8], rdx
    je .Lhit
    add r8, 32
    dec rcx
    jmp .Lnext
.Lnobody:
    cmp byte ptr [rdx], 0xcc
    je .Lnotours                        # still an int3 that no probe owns: not ours
    # The int3 is gone: a probe was removed right after this CPU trapped on it. Go back and run
    # the instruction that is there now.
    mov qword ptr [rdi+8], rdx
    inc qword ptr gs:[PCPU_KP_RETRY]
    mov eax, 1
    ret
.Lnotours:
    xor eax, eax
    ret
.Lhit:
    movzx eax, byte ptr [r8+17]
    inc qword ptr gs:[PCPU_KP_HITS+rax*8]   # the probe's callback
    mov rax, qword ptr [r8+8]
    mov qword ptr [rdi+8], rax          # continue out of line
    mov eax, 1
    ret
SYM_FUNC_END(kprobe_int3_handler)

# The instruction slots of boosted kprobes: KPROBE_MAX slots of KPROBE_SLOT_SIZE bytes, int3 when
# free. Executable kernel text, written by the patcher (text_poke), never executed from here.
SYM_FUNC_START(kprobe_insn_slots)
    KPROBE_SLOT_AREA
    ud2
SYM_FUNC_END(kprobe_insn_slots)

# The detour buffers of optimized kprobes: KPROBE_MAX buffers of OPTPROBE_SLOT_SIZE bytes.
SYM_FUNC_START(optprobe_insn_slots)
    OPTPROBE_SLOT_AREA
    ud2
SYM_FUNC_END(optprobe_insn_slots)

# The scheduler tick of a preemptible kernel (CONFIG_PREEMPT), in kernels built with probes: the
# tick preempts the running task, another task runs for a while with interrupts on (so this CPU
# takes sync IPIs meanwhile), then the preempted task resumes where it was -- possibly inside an
# out-of-line slot or an optprobe's range, which is why kprobes wait for a grace period. How long
# the other task runs: PREEMPT_SPIN iterations times 2**k, k drawn from the preempted workload's own
# random state (r12's top 3 bits: a seeded, heavy-tailed time off the CPU). A tick while the other
# task runs only accounts it.
SYM_FUNC_START(preempt_tick_entry)
    push rax
    push rcx
    cmp qword ptr gs:[PCPU_PREEMPT_ACTIVE], 0
    jne .Lbusy
    inc qword ptr gs:[PCPU_PREEMPT_TICKS]
    inc qword ptr gs:[PCPU_PREEMPT_ACTIVE]
    mov rcx, r12
    shr rcx, 61
    mov rax, qword ptr gs:[PCPU_PREEMPT_SPIN]
    shl rax, cl
    pushfq
    or qword ptr [rsp], 0x200
    popfq                               # another task runs, interrupts on
.Lother_task:
    dec rax
    jnz .Lother_task
    cli                                 # schedule() back to the preempted task
    dec qword ptr gs:[PCPU_PREEMPT_ACTIVE]
.Lbusy:
    pop rcx
    pop rax
    jmp native_iret
SYM_FUNC_END(preempt_tick_entry)
