# The stop_machine stopper: multi_cpu_stop on one CPU. The patcher wakes it with an IPI on every
# other CPU (as Linux queues work to each CPU's stopper thread and wakes it); delivery charges the
# thread's scheduling (`stopper_wakeup`), and the interrupt gate means it cannot start while the CPU
# runs with interrupts off. From then on it is a thread: interrupts back on, then the stage loop.
# A CPU inside a preempt-off section (PCPU_PREEMPT_COUNT) takes the IPI but cannot switch to the
# stopper: it marks a reschedule as pending, and preempt_enable runs the stopper.
#
# Stages (STOP_STATE): NONE 0, PREPARE 1, DISABLE_IRQ 2, RUN 3, EXIT 4. Every CPU, the caller
# included, acts on each new stage once and acknowledges it; the acknowledgement is a decrement of
# the shared STOP_THREAD_ACK, and the CPU whose decrement reaches zero re-arms it with the thread
# count and moves everyone to the next stage: each stage is a barrier of all CPUs. DISABLE_IRQ turns
# interrupts off, RUN runs the function on the active CPU (the caller: the patcher writes the text),
# and after acknowledging EXIT the stopper returns; its iretq serializes.
SYM_FUNC_START(stopper_entry)
    cmp qword ptr gs:[PCPU_PREEMPT_COUNT], 0
    je .Lrun
    mov qword ptr gs:[PCPU_NEED_RESCHED], 1
    jmp native_iret                     # preemption is off: the stopper runs at preempt_enable
.Lrun:
    call multi_cpu_stop
    jmp native_iret
SYM_FUNC_END(stopper_entry)

# preempt_enable found a reschedule pending: switch to the stopper now. It returns with `ret`, as
# schedule() back to a preempted kernel task does: no iretq, so no serializing event on this path.
SYM_FUNC_START(preempt_schedule)
    mov qword ptr gs:[PCPU_NEED_RESCHED], 0
    call multi_cpu_stop
    ret
SYM_FUNC_END(preempt_schedule)

SYM_FUNC_START(multi_cpu_stop)
    push rax
    push rbx
    push rcx
    push rdx
    pushfq                              # the flags to restore at the end
    lock inc qword ptr gs:[PCPU_STOP_ACK]
    pushfq
    or qword ptr [rsp], 0x200
    popfq                               # a thread runs with interrupts on
    mov rbx, STOP_STATE
    xor ecx, ecx                        # the stage this CPU last acted on: NONE
.Lwait:
    pause
    mov rax, qword ptr [rbx]
    cmp rax, rcx
    je .Lwait
    mov rcx, rax
    mov qword ptr gs:[PCPU_STOP_STAGE], rax
    cmp rax, MULTI_STOP_DISABLE_IRQ
    jne stopper_ack
    pushfq
    and qword ptr [rsp], -0x201
    popfq                               # local_irq_disable
SYM_INNER_LABEL(stopper_ack)
    lock dec qword ptr [rbx+8]          # ack_state: the last CPU to ack moves everyone on
    jnz .Lacked
    mov rdx, qword ptr [rbx+16]
    mov qword ptr [rbx+8], rdx          # re-arm the barrier with the thread count ...
    lea rdx, [rax+1]
    mov qword ptr [rbx], rdx            # ... then publish the next stage
.Lacked:
    cmp rcx, MULTI_STOP_EXIT
    jne .Lwait
    lock inc qword ptr gs:[PCPU_STOP_EXIT]
    popfq                               # local_irq_restore
    pop rdx
    pop rcx
    pop rbx
    pop rax
    ret
SYM_FUNC_END(multi_cpu_stop)
