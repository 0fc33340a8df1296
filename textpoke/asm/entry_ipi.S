# The function-call IPI: the sync of text_poke_bp (on_each_cpu(do_sync_core)). Delivery and the
# iretq that ends it are both serializing; the per-CPU counter is the acknowledgement the sender
# waits for.
SYM_FUNC_START(ipi_entry)
    lock inc qword ptr gs:[PCPU_IPI_COUNT]
    jmp native_iret
SYM_FUNC_END(ipi_entry)
