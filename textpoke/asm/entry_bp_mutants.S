# Mutations of the #BP entry for the oracle's tests, kept after every other unit of the kernel so
# that they move no address of the real entries.
#
# bp_entry_emulate_nojmp8: the emulating entry (with its stack gap) behind a handler from before
# 2-byte jump labels, which emulates 5-byte instructions only: a trap on a 2-byte site is not its
# own, and the kernel dies (bp_unhandled), as such a handler would BUG() on an opcode it does not know.

SYM_FUNC_START(bp_entry_emulate_nojmp8)
    push -1                             # orig_ax, and the gap as in bp_entry_emulate
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push rax
    push rcx
    push rdx
    push rdi
    push r8
    push r9
    push r10
    push r11
    push rsi
    lea rdi, [rsp+72]                   # rdi -> orig_ax of the frame iretq will use
    mov esi, 1
    call poke_int3_handler
    test rax, rax
    jz bp_unhandled
    cmp byte ptr [r9+16], 5             # the length of the instruction it stood in for
    jne bp_unhandled                    # not 5 bytes: unknown to this handler
    inc qword ptr gs:[PCPU_BP_COUNT]
    pop rsi
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rdx
    pop rcx
    pop rax
    add rsp, 8                          # orig_ax
    jmp native_iret
SYM_FUNC_END(bp_entry_emulate_nojmp8)
