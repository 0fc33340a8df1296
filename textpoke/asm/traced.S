# One traced function; the image repeats this template NR_TRACED times at a fixed stride, with
# FN_INDEX and FN_MUL substituted. The first instruction is the ftrace site (boot state: the 5-byte
# nop; enabled: call ftrace_caller). Callee-saved registers are preserved.
SYM_FUNC_START(FN_NAME)
    FTRACE_NOP
    push rbx
    mov rbx, rdi
    imul rbx, rbx, FN_MUL
    add rbx, FN_INDEX
    mov rax, rbx
    shr rax, 7
    xor rax, rbx
    pop rbx
    ret
SYM_FUNC_END(FN_NAME)
