# stop_machine-era ftrace (x86, 2.6.28 to 3.4): the NMI side of a text modification.
#
# While the modifier has a write in flight (bit 31 of nmi_running), an NMI performs that same write
# itself before its handler runs: it can then only execute the site as it will be, never half
# written, and a CPU's own store is coherent with its own instruction fetch. nmi_running also counts
# the NMIs inside their handler, so the modifier can wait until none is. Both routines run only
# while ftrace is modifying code (modifying_code, saved per CPU for the exit).
# The pending write goes through the text's writable direct-map alias (MOD_CODE_IP), as
# probe_kernel_write through __va(__pa(ip)) did: 4 bytes, then 1 (a 5-byte memcpy).
SYM_FUNC_START(ftrace_nmi_enter)
    push rax
    push rcx
    push rdx
    mov rdx, FTRACE_MOD
    mov rax, qword ptr [rdx]
    mov qword ptr gs:[PCPU_SAVE_MODIFYING], rax
    test rax, rax
    jz .Lout
    mov eax, 1
    lock xadd qword ptr [rdx+FTRACE_MOD_RUNNING], rax
    bt rax, 31                          # was a write pending when this NMI counted itself in?
    jnc .Lout
    mov rcx, qword ptr [rdx+FTRACE_MOD_IP]
    mov eax, dword ptr [rdx+FTRACE_MOD_NEW]
    mov dword ptr [rcx], eax
    mov al, byte ptr [rdx+FTRACE_MOD_NEW+4]
    mov byte ptr [rcx+4], al
    lock inc qword ptr [rdx+FTRACE_MOD_UPDATES]
.Lout:
    pop rdx
    pop rcx
    pop rax
    ret
SYM_FUNC_END(ftrace_nmi_enter)

SYM_FUNC_START(ftrace_nmi_exit)
    cmp qword ptr gs:[PCPU_SAVE_MODIFYING], 0
    je .Lout
    push rdx
    mov rdx, FTRACE_MOD
    lock dec qword ptr [rdx+FTRACE_MOD_RUNNING]
    pop rdx
.Lout:
    ret
SYM_FUNC_END(ftrace_nmi_exit)

# What the trampolines' ftrace_call can call: nothing (ftrace_stub), the ops list (which calls every
# registered tracer: here the one function tracer), or the function tracer directly.
SYM_FUNC_START(ftrace_stub)
    ret
SYM_FUNC_END(ftrace_stub)

SYM_FUNC_START(ftrace_ops_list_func)
    inc qword ptr gs:[PCPU_FT_LIST]
    call function_tracer
    ret
SYM_FUNC_END(ftrace_ops_list_func)

SYM_FUNC_START(function_tracer)
    inc qword ptr gs:[PCPU_FT_FUNC]
    ret
SYM_FUNC_END(function_tracer)
