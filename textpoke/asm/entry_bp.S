# The #BP (int3) entry and the lock-free patch-descriptor lookup.
#
# The patcher publishes `bp_desc` (refs, nr_entries, entries of 32 bytes: addr, target, len, opcode)
# before it writes the first int3 and withdraws it only after its final sync. The handler takes a
# reference only if refs is not zero (inc-not-zero with cmpxchg), looks the trapping address up, and
# either skips the site (2012 ftrace) or performs the site's new instruction (Linux >= 5.2):
#   CALL  -> push the address after the site on the interrupted stack, continue at the target
#   JMP   -> continue at the target, for a 2-byte jmp8 as for a 5-byte jmp32 (a NOP of either size
#            is published as a JMP to the next instruction)
#   RET   -> pop the return address off the interrupted stack and continue there (a static call
#            site or trampoline set to NULL: `ret` padded with int3)
# An int3 the table does not hold goes to the kprobe handler in a kernel built with kprobes (it owns
# its probes' int3s, and sends a CPU back to an int3 that is already gone); one nobody owns is not
# ours: the kernel would die (`bp_unhandled`).
#
# Frame after delivery (interrupt gate, no IST, IF=0): [rsp] RIP (after the int3), CS, RFLAGS, RSP, SS.

SYM_FUNC_START(bp_entry_emulate)
    push -1                             # orig_ax
    # Leave a gap: copy orig_ax and the five-word frame 48 bytes lower, so an emulated push onto
    # the interrupted stack lands in the old copy and not in the frame iretq will use.
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push rsi                            # saved before esi carries the mode
    mov esi, 1
    jmp bp_common
SYM_FUNC_END(bp_entry_emulate)

# Mutation used by the oracle tests: emulation without the stack gap (pre-5.2 entry code).
SYM_FUNC_START(bp_entry_emulate_nogap)
    push -1
    push rsi                            # saved before esi carries the mode
    mov esi, 1
    jmp bp_common
SYM_FUNC_END(bp_entry_emulate_nogap)

# Mutation used by the oracle tests: a handler that does not know RET (Linux before it learnt to
# emulate RET): an int3 over a site becoming `ret` is not its to handle, and the kernel dies.
SYM_FUNC_START(bp_entry_emulate_noret)
    push -1
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push qword ptr [rsp+40]
    push rsi
    mov esi, 3
    jmp bp_common
SYM_FUNC_END(bp_entry_emulate_noret)

SYM_FUNC_START(bp_entry_skip)
    push -1
    push rsi
    xor esi, esi
    jmp bp_common
SYM_FUNC_END(bp_entry_skip)

# rsp -> the interrupted rsi, then orig_ax, RIP, CS, RFLAGS, RSP, SS; esi = 1 to emulate, 0 to skip
# (3: emulate, but not RET). Every register of the interrupted code comes back as it was: an entry
# saves rsi before it loads the mode (compiled code keeps pointers in rsi across an ftrace site).
SYM_FUNC_START(bp_common)
    push rax
    push rcx
    push rdx
    push rdi
    push r8
    push r9
    push r10
    push r11
    lea rdi, [rsp+72]                   # rdi -> orig_ax of the frame iretq will use
    call poke_int3_handler
    test rax, rax
    KPROBE_CHAIN                        # jz bp_unhandled (with kprobes: kprobe_int3_handler first)
.Lhandled:
    inc qword ptr gs:[PCPU_BP_COUNT]
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rdx
    pop rcx
    pop rax
    pop rsi
    add rsp, 8                          # orig_ax
    jmp native_iret
SYM_FUNC_END(bp_common)

# The one iretq every interrupt and exception return to kernel mode goes through (Linux:
# restore_regs_and_return_to_kernel -> native_irq_return_iret). Every iretq of this kernel is the only
# instruction of its own unit, entered by a jump: the machine executes it from a block hook.
SYM_FUNC_START(native_iret)
    iretq
SYM_FUNC_END(native_iret)

SYM_FUNC_START(bp_unhandled)
    inc qword ptr gs:[PCPU_BP_MISS]
    ud2                                 # die(): an int3 nobody owns
SYM_FUNC_END(bp_unhandled)

# rdi -> orig_ax (RIP at +8, RSP at +32); esi = emulate (bit 0), without RET (bit 1). Returns
# rax = 1 when the trap was ours, with r9 at the descriptor entry it used (entry_bp_mutants.S reads
# its length).
# The lookup is Linux's: a binary search when the table holds more than one entry, a direct compare
# for one.
# Touches rax, rcx, rdx, r8-r11 only, and calls nothing (it must not hit another int3).
SYM_FUNC_START(poke_int3_handler)
    mov r8, BP_DESC
.Lget:
    mov rax, qword ptr [r8]
    test rax, rax
    jz .Lnone                           # no patch in progress
    lea rcx, [rax+1]
    lock cmpxchg qword ptr [r8], rcx
    jnz .Lget
    mov rdx, qword ptr [rdi+8]
    dec rdx                             # the int3 itself
    mov rcx, qword ptr [r8+8]           # nr_entries
    lea r9, [r8+16]                     # the entries, sorted by address
    cmp rcx, 1
    ja .Lbsearch
    jb .Lmiss
    cmp qword ptr [r9], rdx             # a single entry: compare it directly
    je .Lfound
    jmp .Lmiss
.Lbsearch:                              # binary search over [r10, rcx)
    xor r10d, r10d
.Lhalve:
    cmp r10, rcx
    jae .Lmiss
    lea r11, [r10+rcx]
    shr r11, 1                          # middle
    mov rax, r11
    shl rax, 5                          # 32-byte entries
    add rax, r9
    cmp rdx, qword ptr [rax]
    je .Lhit
    jb .Llower
    lea r10, [r11+1]
    jmp .Lhalve
.Llower:
    mov rcx, r11
    jmp .Lhalve
.Lhit:
    mov r9, rax
.Lfound:
    movzx r10, byte ptr [r9+16]
    lea r11, [rdx+r10]                  # the instruction after the site
    test esi, esi
    jz .Lskip
    movzx eax, byte ptr [r9+17]
    cmp eax, 0xcc
    je .Lmiss                           # a new int3 is not ours to consume
    cmp eax, 0xc3
    je .Lret
    cmp eax, 0xe8
    jne .Ljmp
    mov rax, qword ptr [rdi+32]         # emulate CALL: push the return address ...
    sub rax, 8
    mov qword ptr [rax], r11
    mov qword ptr [rdi+32], rax
.Ljmp:
    mov rax, qword ptr [r9+8]           # ... and continue at the target
    mov qword ptr [rdi+8], rax
    jmp .Lput
.Lret:
    test esi, 2
    jnz .Lmiss                          # (mutation) RET unknown: not ours
    mov rax, qword ptr [rdi+32]         # emulate RET: pop the return address ...
    mov r11, qword ptr [rax]
    add rax, 8
    mov qword ptr [rdi+32], rax
    mov qword ptr [rdi+8], r11          # ... and continue there
    jmp .Lput
.Lskip:
    mov qword ptr [rdi+8], r11
.Lput:
    lock dec qword ptr [r8]
    mov eax, 1
    ret
.Lmiss:
    lock dec qword ptr [r8]
.Lnone:
    xor eax, eax
    ret
SYM_FUNC_END(poke_int3_handler)
