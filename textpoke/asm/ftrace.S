# The ftrace trampolines an enabled site calls (a template, expanded once per tracer: "" is
# ftrace_caller, "_alt" is ftrace_caller_alt, a second tracer to retarget enabled sites to, as ftrace
# switches between trampolines). Each counts the call per CPU and per traced function; the function
# is found from the return address (site + 5), since traced functions sit at a fixed stride. Then
# `ftrace_call`, a patchable 5-byte call inside the trampoline, calls the current tracer function
# (ftrace_stub at boot; ftrace_modify_all_code points it at ftrace_ops_list_func and the tracer).
SYM_FUNC_START(ftrace_caller{V})
    push rax
    push rdx
    mov rax, qword ptr [rsp+16]
    mov rdx, TRACED_BASE_PLUS_5
    sub rax, rdx
    shr rax, FN_SHIFT
    cmp rax, NR_TRACED
    jae .Lout
?MAIN    inc qword ptr gs:[PCPU_FT_COUNT+rax*8]
?ALT    inc qword ptr gs:[PCPU_FT_ALT_COUNT+rax*8]
SYM_INNER_LABEL(ftrace_call{V})
    call ftrace_stub
.Lout:
    pop rdx
    pop rax
    ret
SYM_FUNC_END(ftrace_caller{V})
