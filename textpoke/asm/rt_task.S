# The periodic real-time task: cyclictest's measuring loop, run where the kernel's timerlat tracer
# measures its first figure, in the local APIC timer's interrupt handler (interrupt gate: IF=0).
#
# Each tick it reads the TSC (the machine supplies a deterministic one: the CPU's cycle clock) and
# records one sample (expected expiry, wake-up time) in this CPU's ring, then moves its expected
# expiry past now. Ticks that expired while it was held back were merged by the APIC (one request
# bit per vector): each counts as an overrun. A tick that expires after the interrupt was taken but
# before the TSC read is delivered again after this handler returns, and finds its expiry already
# counted as an overrun: it is recorded against the tick before RT_NEXT and the overrun taken back.
SYM_FUNC_START(rt_timer_entry)
    push rax
    push rcx
    push rdx
    rdtsc
    shl rdx, 32
    or rax, rdx                         # rax = now
    mov rcx, qword ptr gs:[PCPU_RT_NEXT]
    cmp rax, rcx
    jge .Lrecord
    sub rcx, qword ptr gs:[PCPU_RT_PERIOD]   # the re-delivered tick (its overrun is taken back below)
.Lrecord:
    mov rdx, qword ptr gs:[PCPU_RT_COUNT]
    and rdx, RT_RING_MASK
    shl rdx, 4
    mov qword ptr gs:[PCPU_RT_RING+rdx], rcx     # expected expiry
    mov qword ptr gs:[PCPU_RT_RING+8+rdx], rax   # wake-up
    inc qword ptr gs:[PCPU_RT_COUNT]
    mov rcx, qword ptr gs:[PCPU_RT_PERIOD]
.Lnext:
    mov rdx, qword ptr gs:[PCPU_RT_NEXT]
    cmp rdx, rax
    jg .Ldone
    add qword ptr gs:[PCPU_RT_NEXT], rcx
    inc qword ptr gs:[PCPU_RT_OVERRUNS]
    jmp .Lnext
.Ldone:
    dec qword ptr gs:[PCPU_RT_OVERRUNS]      # the tick just served is no overrun
    pop rdx
    pop rcx
    pop rax
    jmp native_iret
SYM_FUNC_END(rt_timer_entry)
