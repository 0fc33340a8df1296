# NMI entries. Hardware delivered the NMI on the NMI IST stack (IST2) with NMIs now blocked.
#
# naive: save what the handler clobbers, run it, iretq. A nested NMI (possible as soon as any iretq
# ran inside the handler, e.g. an int3's) restarts at the same IST top and overwrites this frame.
SYM_FUNC_START(nmi_entry_naive)
    PUSH_CALLER_SAVED
    call nmi_handler
    POP_CALLER_SAVED
    jmp nmi_iret
SYM_FUNC_END(nmi_entry_naive)

# The NMI entries' own iretq (Linux returns from an NMI with its own iretq, not the common path).
SYM_FUNC_START(nmi_iret)
    iretq
SYM_FUNC_END(nmi_iret)

# The NMI handler body (exc_nmi's work): perf/watchdog callbacks that call traced functions, part of
# it on this CPU's second (irq) stack, as real handlers may switch stacks. NMI_CALLBACKS_LOW/HIGH
# expand to a chain of direct calls (so the call graph sees them), one taken per run: the lower half
# of the NMI's functions on the NMI stack, the upper half on the irq stack.
SYM_FUNC_START(nmi_handler)
    push rbx
    cld
    call ftrace_nmi_enter               # nmi_enter(): a pending ftrace write is done first
    inc qword ptr gs:[PCPU_NMI_COUNT]
    mov rbx, qword ptr gs:[PCPU_NMI_COUNT]
    and rbx, NMI_FUNCS_HALF_MASK
    NMI_CALLBACKS_LOW                   # one of fn_000 .. : direct calls, picked by rbx
    # switch to the irq stack unless already on it, and call another traced function there
    mov rax, rsp
    mov rcx, qword ptr gs:[PCPU_IRQ_STACK_TOP]
    cmp rax, rcx
    ja .Lswitch
    lea rdx, [rcx-IRQ_STACK_SIZE]
    cmp rax, rdx
    ja .Lstay
.Lswitch:
    mov rsp, rcx
.Lstay:
    push rax
    NMI_CALLBACKS_HIGH                  # one of the upper half, on the irq stack
    pop rax
    mov rsp, rax
    call ftrace_nmi_exit
    pop rbx
    ret
SYM_FUNC_END(nmi_handler)
