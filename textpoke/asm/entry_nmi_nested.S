# The x86_64 nested-NMI-safe entry (arch/x86/entry/entry_64.S, asm_exc_nmi from kernel mode, with
# the check order of the 2015 rework). A template: the image builder expands it once per variant,
# with {V} a suffix and lines starting "?FLAG " kept only when the variant has FLAG ("?!FLAG ": only
# when it has not). The correct entry has every flag; each mutation drops one:
#   RIP    the check that the interrupted RIP lies in the repeat_nmi trampoline
#   VAR    the on-stack "NMI executing" variable
#   RSP    the check that the interrupted RSP lies in this CPU's NMI stack (with DF set)
#   SAVED  the trampoline restores the iret frame from the saved "outermost" copy
#
# The NMI stack, from its top T (the hardware always starts an NMI at T, even on this stack):
#   T-8  .. T-40    hardware frame: SS, RSP, RFLAGS, CS, RIP (a nested NMI overwrites it)
#   T-48            rdx, saved while the checks run
#   T-56            "NMI executing"
#   T-64 .. T-96    "iret" frame: the one the final iretq uses; a nested NMI points it at repeat_nmi
#   T-104 .. T-136  "outermost" frame: the copy of the original hardware frame
#   T-144           orig_ax, then the saved registers and the handler's own stack

SYM_FUNC_START(nmi_entry_nested{V})
    push rdx                            # RSP = T-48: RIP at +8, CS +16, RFLAGS +24, RSP +32, SS +40
?RIP    cmp qword ptr [rsp+8], repeat_nmi{V}
?RIP    jb .Lnot_repeat
?RIP    cmp qword ptr [rsp+8], end_repeat_nmi{V}
?RIP    jb nmi_nested_out{V}             # the outer NMI is about to run the handler again anyway
.Lnot_repeat:
?VAR    cmp qword ptr [rsp-8], 1
?VAR    je nmi_nested{V}
?RSP    lea rdx, [rsp+48]                # T
?RSP    cmp rdx, qword ptr [rsp+32]
?RSP    jb nmi_first{V}                  # interrupted RSP above this stack
?RSP    sub rdx, NMI_STACK_SIZE
?RSP    cmp rdx, qword ptr [rsp+32]
?RSP    ja nmi_first{V}                  # below it
?RSP    test byte ptr [rsp+25], 4        # DF of the interrupted RFLAGS: set only in the exit window
?RSP    jnz nmi_nested{V}
    jmp nmi_first{V}
SYM_FUNC_END(nmi_entry_nested{V})

# Nested: make the outer NMI's iret frame return into repeat_nmi, with RSP at the outermost frame,
# and go back to the outer NMI. The handler is not called: the outer NMI will run it again.
SYM_FUNC_START(nmi_nested{V})
    sub rsp, 8                          # T-56
    lea rdx, [rsp-80]                   # T-136
    push KERNEL_DS                      # T-64
    push rdx                            # T-72
    pushfq                              # T-80
    push KERNEL_CS                      # T-88
    push repeat_nmi{V}                  # T-96
    add rsp, 48                         # T-48
    jmp nmi_nested_out{V}
SYM_FUNC_END(nmi_nested{V})

SYM_FUNC_START(nmi_nested_out{V})
    pop rdx
    jmp nmi_iret
SYM_FUNC_END(nmi_nested_out{V})

SYM_FUNC_START(nmi_first{V})
    mov rdx, qword ptr [rsp]
    push 0                              # "NMI executing" = 0 (T-56)
    sub rsp, 40                         # leave room for the iret frame (T-96)
    push qword ptr [rsp+88]             # copy the hardware frame into the outermost frame
    push qword ptr [rsp+88]
    push qword ptr [rsp+88]
    push qword ptr [rsp+88]
    push qword ptr [rsp+88]             # RSP = T-136
SYM_INNER_LABEL(repeat_nmi{V})
    mov qword ptr [rsp+80], 1           # "NMI executing" = 1
    add rsp, 80                         # T-56
?SAVED    push qword ptr [rsp-48]       # copy the outermost frame into the iret frame
?SAVED    push qword ptr [rsp-48]
SYM_INNER_LABEL(repeat_nmi_copy{V})
?SAVED    push qword ptr [rsp-48]
?SAVED    push qword ptr [rsp-48]
?SAVED    push qword ptr [rsp-48]
?!SAVED   push qword ptr [rsp+48]       # mutation: copy the hardware frame, which a nested NMI
?!SAVED   push qword ptr [rsp+48]       # has overwritten with its own
?!SAVED   push qword ptr [rsp+48]
?!SAVED   push qword ptr [rsp+48]
?!SAVED   push qword ptr [rsp+48]
    sub rsp, 40                         # T-136
SYM_INNER_LABEL(end_repeat_nmi{V})
    push -1                             # orig_ax
    PUSH_CALLER_SAVED
    cld
    call nmi_handler
    POP_CALLER_SAVED
    add rsp, 48                         # orig_ax and the outermost frame: RSP = T-96, the iret frame
    std                                 # marks the exit window for the RSP check
    mov qword ptr [rsp+40], 0           # "NMI executing" = 0
SYM_INNER_LABEL(nmi_exit_window{V})
    jmp nmi_iret
SYM_FUNC_END(nmi_first{V})
