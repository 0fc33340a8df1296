# One traced function; the image repeats this template NR_TRACED times at a fixed stride, with
# FN_INDEX and FN_MUL substituted. The first instruction is the ftrace site (boot state: the 5-byte
# nop; enabled: call ftrace_caller). Callee-saved registers are preserved.
# In a kernel built for kprobes (`?PROBES` lines kept), a jump ends the translated block before the
# kprobe point (`mov rbx, rdi`) and before the optprobe range (`mov rax, rbx; shr rax, 7`), so each
# begins a block of its own: the machine observes a site's executions at block starts only.
SYM_FUNC_START(FN_NAME)
    FTRACE_NOP
    push rbx
?PROBES jmp .Lkprobe_point
?PROBES .Lkprobe_point:
    mov rbx, rdi
    imul rbx, rbx, FN_MUL
    add rbx, FN_INDEX
?PROBES jmp .Loptprobe_range
?PROBES .Loptprobe_range:
    mov rax, rbx
    shr rax, 7
    xor rax, rbx
    pop rbx
    ret
SYM_FUNC_END(FN_NAME)
