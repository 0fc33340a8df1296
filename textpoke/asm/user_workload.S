# The per-CPU workload of a kernel built with the user's objects (`--object`): forever call the
# user's `void textpoke_workload(void)`, then do what the built-in workload does at the end of an
# iteration: count it, stop with hlt after LOOP_LIMIT iterations (bounded runs, drains), and now and
# then run an interrupts-off section when the per-CPU knobs ask for one (the decision uses the
# per-CPU LCG in r12, which the C code preserves as a callee-saved register). Each iteration's LCG
# value is published in the per-CPU area for the C code (textpoke_random()): seeded per CPU and per
# run, so runs stay deterministic. The stack is 16-byte aligned at the call, as the C ABI wants.
SYM_FUNC_START(workload_main)
    and rsp, -16
.Lloop:
    mov rax, 6364136223846793005
    imul r12, rax
    mov rax, 1442695040888963407
    add r12, rax
    mov qword ptr gs:[PCPU_RANDOM], r12 # textpoke_random(): this iteration's random number
    call textpoke_workload
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
SYM_INNER_LABEL(workload_irqoff)        # block starts, as in workload.S: the interruption meter probes them
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
SYM_FUNC_END(workload_main)
