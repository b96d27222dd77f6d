/*
 * hammer - the exit round-trip benchmark guest.  Contract: README.md.
 *
 * Build-time parameters (as --defsym NAME=VALUE; defaults below):
 *   ITER          iterations per phase                      (20000)
 *   PIO_INTERNAL  port read in phase 1, answered inside vmmd  (0x510)
 *   PIO_DEVICE    port read in phase 2 / written in phase 3,
 *                 answered by a device process over the bus (0x3ff, COM1 SCR)
 *   MMIO_ADDR     address read (4 bytes) in phase 4, unbacked (0xd0000000)
 *
 * Output:
 *   HAMMER START
 *   P1 DONE
 *   P2 DONE
 *   P3 DONE
 *   P4 DONE
 *   CYCLES p1=<hex> p2=<hex> p3=<hex> p4=<hex>
 *   HAMMER END
 * then reset.
 */
    .include "serial.inc"

    .ifndef ITER
    .set ITER, 20000
    .endif
    .ifndef PIO_INTERNAL
    .set PIO_INTERNAL, 0x510
    .endif
    .ifndef PIO_DEVICE
    .set PIO_DEVICE, 0x3ff
    .endif
    .ifndef MMIO_ADDR
    .set MMIO_ADDR, 0xd0000000
    .endif

    .section .text.entry, "ax", @progbits
    .globl _start
_start:
    cld
    PUTS msg_start

    /* phase 1: ITER x `in al, dx` from PIO_INTERNAL (vmmd-internal handler) */
    call tsc_now
    mov %rax, %rbx
    movabs $ITER, %rcx
    mov $PIO_INTERNAL, %dx
    test %rcx, %rcx
    jz 2f
1:  inb %dx, %al
    dec %rcx
    jnz 1b
2:  call tsc_now
    sub %rbx, %rax
    mov %rax, %r12
    PUTS msg_p1

    /* phase 2: ITER x `in al, dx` from PIO_DEVICE (synchronous bus round trip) */
    call tsc_now
    mov %rax, %rbx
    movabs $ITER, %rcx
    mov $PIO_DEVICE, %dx
    test %rcx, %rcx
    jz 2f
1:  inb %dx, %al
    dec %rcx
    jnz 1b
2:  call tsc_now
    sub %rbx, %rax
    mov %rax, %r13
    PUTS msg_p2

    /* phase 3: ITER x `out dx, al` to PIO_DEVICE (posted bus write);
     * the value written is the low byte of the remaining-iterations count */
    call tsc_now
    mov %rax, %rbx
    movabs $ITER, %rcx
    mov $PIO_DEVICE, %dx
    test %rcx, %rcx
    jz 2f
1:  mov %cl, %al
    outb %al, %dx
    dec %rcx
    jnz 1b
2:  call tsc_now
    sub %rbx, %rax
    mov %rax, %r14
    PUTS msg_p3

    /* phase 4: ITER x 4-byte loads from MMIO_ADDR (KVM_EXIT_MMIO, vmmd) */
    call tsc_now
    mov %rax, %rbx
    movabs $ITER, %rcx
    movabs $MMIO_ADDR, %rdi
    test %rcx, %rcx
    jz 2f
1:  movl (%rdi), %eax
    dec %rcx
    jnz 1b
2:  call tsc_now
    sub %rbx, %rax
    mov %rax, %r15
    PUTS msg_p4

    PUTS msg_cycles_p1
    mov %r12, %rax
    call serial_puthex
    PUTS msg_cycles_p2
    mov %r13, %rax
    call serial_puthex
    PUTS msg_cycles_p3
    mov %r14, %rax
    call serial_puthex
    PUTS msg_cycles_p4
    mov %r15, %rax
    call serial_puthex
    PUTC '\n'

    PUTS msg_end
    jmp guest_reset

    .section .rodata
msg_start:      .asciz "HAMMER START\n"
msg_p1:         .asciz "P1 DONE\n"
msg_p2:         .asciz "P2 DONE\n"
msg_p3:         .asciz "P3 DONE\n"
msg_p4:         .asciz "P4 DONE\n"
msg_cycles_p1:  .asciz "CYCLES p1="
msg_cycles_p2:  .asciz " p2="
msg_cycles_p3:  .asciz " p3="
msg_cycles_p4:  .asciz " p4="
msg_end:        .asciz "HAMMER END\n"
