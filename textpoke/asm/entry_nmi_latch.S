# The i386-style NMI entry (arch/x86/kernel/nmi.c, nmi_state): no IST on i386, so the NMI runs on the
# interrupted stack and a nested NMI cannot overwrite the outer one's frame; instead a per-CPU state
# NOT_RUNNING (0) / EXECUTING (1) / LATCHED (2) makes a nested NMI only ask for a rerun. A template,
# expanded once per exit: {V} the suffix, "?FLAG " lines kept for that exit only:
#   CMPXCHG   exit with cmpxchg(EXECUTING -> NOT_RUNNING), rerun if it failed (the article)
#   CMPXCHG386  the same cmpxchg as a 386 without one does it: interrupts off, load, compare, store;
#               an NMI between the compare and the store sets LATCHED, and the store then loses it
#   DEC       exit with a decrement: EXECUTING -> 0 done, LATCHED -> EXECUTING rerun (Linux today)
SYM_FUNC_START(nmi_entry_latch{V})
    PUSH_CALLER_SAVED
    cmp qword ptr gs:[PCPU_NMI_STATE], 0
    je .Lfirst
    mov qword ptr gs:[PCPU_NMI_STATE], 2        # LATCHED: the running handler will run again
    jmp .Lout
.Lfirst:
    mov qword ptr gs:[PCPU_NMI_STATE], 1        # EXECUTING
.Lrestart:
    cld
    call nmi_handler
?CMPXCHG    mov eax, 1
?CMPXCHG    xor ecx, ecx
?CMPXCHG    lock cmpxchg qword ptr gs:[PCPU_NMI_STATE], rcx
?CMPXCHG    je .Lout
?CMPXCHG    mov qword ptr gs:[PCPU_NMI_STATE], 1
?CMPXCHG    jmp .Lrestart
?CMPXCHG386    pushfq
?CMPXCHG386    cli
?CMPXCHG386    mov rax, qword ptr gs:[PCPU_NMI_STATE]
?CMPXCHG386    cmp rax, 1
?CMPXCHG386    jne .Lfailed
SYM_INNER_LABEL(nmi_latch_window{V})
?CMPXCHG386    mov qword ptr gs:[PCPU_NMI_STATE], 0
?CMPXCHG386    popfq
?CMPXCHG386    jmp .Lout
?CMPXCHG386 .Lfailed:
?CMPXCHG386    popfq
?CMPXCHG386    mov qword ptr gs:[PCPU_NMI_STATE], 1
?CMPXCHG386    jmp .Lrestart
?DEC    dec qword ptr gs:[PCPU_NMI_STATE]
?DEC    jnz .Lrestart
.Lout:
    POP_CALLER_SAVED
    jmp nmi_iret
SYM_FUNC_END(nmi_entry_latch{V})
