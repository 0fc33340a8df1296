# The ftrace trampolines of a kernel built with the user's objects (a template like ftrace.S: ""
# is ftrace_caller, "_alt" ftrace_caller_alt). Compiled functions do not sit at a fixed stride, so
# the trampoline finds the site from its return address (site + 5) by binary search in the sorted
# table of every site (FTRACE_SITE_TABLE, NR_SITES entries), as Linux looks an ip up in its sorted
# ftrace records, and counts the call per CPU and per site index. An address not in the table is
# not counted.
SYM_FUNC_START(ftrace_caller{V})
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    mov rax, qword ptr [rsp+40]
    sub rax, 5                          # the site
    mov rsi, FTRACE_SITE_TABLE
    xor ecx, ecx                        # low
    mov edx, NR_SITES                   # high (exclusive)
.Lsearch:
    cmp rcx, rdx
    jae .Lout
    lea rdi, [rcx+rdx]
    shr rdi, 1
    cmp rax, qword ptr [rsi+rdi*8]
    je .Lfound
    jb .Lbelow
    lea rcx, [rdi+1]
    jmp .Lsearch
.Lbelow:
    mov rdx, rdi
    jmp .Lsearch
.Lfound:
?MAIN    inc qword ptr gs:[PCPU_FT_COUNT+rdi*8]
?ALT    inc qword ptr gs:[PCPU_FT_ALT_COUNT+rdi*8]
.Lout:
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret
SYM_FUNC_END(ftrace_caller{V})
