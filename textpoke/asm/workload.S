# The per-CPU workload: forever pick a traced function with a per-CPU LCG (r12, seeded at boot),
# count the call in this CPU's own counters, call it (half the time with the stack 8 bytes off, so
# int3 frames land at both 16-byte alignments), do a random amount of busy work on per-CPU memory (loads and stores, like most kernel code), and now and then
# run an interrupts-off section (pushfq; cli; ...; popfq) when the per-CPU knobs ask for one -- or,
# on a CPU whose PREEMPT_OFF knob is set, a preempt-off section of the same length (interrupts on).
# With a non-zero LOOP_LIMIT it stops with hlt after that many iterations (raw-speed benchmarks).
SYM_FUNC_START(workload_main)
.Lloop:
    mov rax, 6364136223846793005
    imul r12, rax
    mov rax, 1442695040888963407
    add r12, rax
    mov rax, r12
    shr rax, 32
    imul rax, rax, NR_TRACED
    shr rax, 32
    mov rbx, rax
    inc qword ptr gs:[PCPU_WL_COUNT+rbx*8]
    shl rax, FN_SHIFT
    mov rcx, TRACED_BASE
    add rax, rcx
    mov rdi, r12
    bt r12, 40
    jc .Lodd
    call rax
    jmp .Lwork
.Lodd:
    push rax
    call rax
    pop rcx
.Lwork:
    mov rcx, r12
    shr rcx, 48
    and rcx, qword ptr gs:[PCPU_WORK_MASK]
.Lspin:
    test rcx, rcx
    jz .Ldone
    mov rax, qword ptr gs:[PCPU_SCRATCH+rcx*8]
    add rax, r13
    mov qword ptr gs:[PCPU_SCRATCH+rcx*8], rax
    xor r13, rax
    dec rcx
    jmp .Lspin
.Ldone:
    inc qword ptr gs:[PCPU_LOOPS]
    mov rax, qword ptr gs:[PCPU_LOOP_LIMIT]
    test rax, rax
    jz .Lnolimit
    cmp rax, qword ptr gs:[PCPU_LOOPS]
    ja .Lnolimit
    jmp cpu_halt                        # a bounded run (benchmarks, drains) ends here
.Lnolimit:
    mov rax, qword ptr gs:[PCPU_IRQOFF_MASK]
    test rax, rax
    jz .Lloop
    mov rcx, r12
    shr rcx, 20
    and rcx, rax
    jnz .Lloop
    cmp qword ptr gs:[PCPU_PREEMPT_OFF], 0
    jne .Lpreempt_off
SYM_INNER_LABEL(workload_irqoff)        # each starts a block (after a branch): a probe can mark them
    pushfq
    cli
    mov rcx, qword ptr gs:[PCPU_IRQOFF_LEN]
.Loff:
    pause
    dec rcx
    jnz .Loff
SYM_INNER_LABEL(workload_irqon)
    popfq
    jmp .Lloop
.Lpreempt_off:
    inc qword ptr gs:[PCPU_PREEMPT_COUNT]   # preempt_disable: interrupts stay on
    mov rcx, qword ptr gs:[PCPU_IRQOFF_LEN]
.Lpoff:
    pause
    dec rcx
    jnz .Lpoff
    dec qword ptr gs:[PCPU_PREEMPT_COUNT]   # preempt_enable ...
    jnz .Lloop
    cmp qword ptr gs:[PCPU_NEED_RESCHED], 0
    je .Lloop
    call preempt_schedule                   # ... and switch to the woken stopper
    jmp .Lloop
SYM_FUNC_END(workload_main)

# Stop this CPU. (Every hlt of the kernel starts a unit of its own: the machine sees it from a
# block hook, since a hlt ends Unicorn's run without saying how many instructions ran.)
SYM_FUNC_START(cpu_halt)
.Lagain:
    hlt
    jmp .Lagain
SYM_FUNC_END(cpu_halt)

# Where the patcher CPU idles when no agent occupies it. (No pause: Unicorn leaves its execution
# loop on every pause, which would make idling the most expensive thing the machine does.)
SYM_FUNC_START(idle_main)
.Lidle:
    inc qword ptr gs:[PCPU_LOOPS]
    jmp .Lidle
SYM_FUNC_END(idle_main)
