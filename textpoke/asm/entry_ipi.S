# The function-call IPI: the sync of text_poke_bp (on_each_cpu(do_sync_core)). Delivery does not
# serialize (the SDM does not list it): do_sync_core calls sync_core() itself, and only then is the
# call done and acknowledged. sync_core() here is cpuid, as Linux's was before IRET-to-self and
# SERIALIZE; the per-CPU counter is the acknowledgement the sender waits for, and the handler
# returns with iretq like every interrupt.
SYM_FUNC_START(ipi_entry)
    push rax
    push rbx
    push rcx
    push rdx
    xor eax, eax
    cpuid                               # sync_core(): serializing
    pop rdx
    pop rcx
    pop rbx
    pop rax
    lock inc qword ptr gs:[PCPU_IPI_COUNT]
    jmp native_iret
SYM_FUNC_END(ipi_entry)
