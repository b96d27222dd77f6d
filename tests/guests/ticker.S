/*
 * ticker - a never-ending guest for vCPU pause/resume tests.  Contract:
 * README.md.
 *
 * Prints "PING 0\n", "PING 1\n", ... (decimal counter) on COM1 forever,
 * spinning SPIN iterations of `dec; jnz` between two lines.
 *
 * Build-time parameter (as --defsym SPIN=N): SPIN, default 10000000.
 */
    .include "serial.inc"

    .ifndef SPIN
    .set SPIN, 10000000
    .endif

    .section .text.entry, "ax", @progbits
    .globl _start
_start:
    cld
    xor %ebx, %ebx              /* counter */
tick:
    PUTS msg_ping
    mov %rbx, %rax
    call serial_putdec
    PUTC '\n'
    inc %rbx
    movabs $SPIN, %rcx
    test %rcx, %rcx
    jz tick
1:  dec %rcx
    jnz 1b
    jmp tick

    .section .rodata
msg_ping:
    .asciz "PING "
