# The stop_machine stopper. The patcher wakes it with an IPI on every other CPU (as Linux wakes the
# per-CPU stopper thread); it runs with interrupts off (interrupt gate), acknowledges, spins until
# the patcher releases it, serializes (sync_core: cpuid) and goes back to what the CPU was doing.
# NMIs still arrive while it spins, and run the NMI handler.
SYM_FUNC_START(stopper_entry)
    push rax
    push rbx
    push rcx
    push rdx
    lock inc qword ptr gs:[PCPU_STOP_ACK]
    mov rbx, STOP_STATE
.Lspin:
    pause
    cmp qword ptr [rbx], 0
    jne .Lspin
    xor eax, eax
    cpuid
    lock inc qword ptr gs:[PCPU_STOP_EXIT]
    pop rdx
    pop rcx
    pop rbx
    pop rax
    jmp native_iret
SYM_FUNC_END(stopper_entry)
