# The runtime a kernel built with the user's objects provides: the string functions compilers emit
# calls to even in freestanding code (struct copies, zeroing), as the kernel's own memcpy/memset do.
# Not traced (no ftrace site), like Linux's assembly string functions.
SYM_FUNC_START(memcpy)
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret
SYM_FUNC_END(memcpy)

SYM_FUNC_START(memset)
    mov r9, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r9
    ret
SYM_FUNC_END(memset)

# Copies backwards when the destination is above an overlapping source (a byte loop: no std,
# since a set DF marks the NMI exit window for the nested-NMI entry's checks).
SYM_FUNC_START(memmove)
    mov rax, rdi
    mov rcx, rdx
    cmp rdi, rsi
    jbe .Lforward
.Lback:
    test rcx, rcx
    jz .Ldone
    dec rcx
    mov r8b, byte ptr [rsi+rcx]
    mov byte ptr [rdi+rcx], r8b
    jmp .Lback
.Lforward:
    rep movsb
.Ldone:
    ret
SYM_FUNC_END(memmove)
