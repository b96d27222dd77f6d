/*
 * hello - prints exactly "Hello from vmmd test guest\n" on COM1, then resets.
 * Contract: tests/guests/README.md.
 */
    .include "serial.inc"

    .section .text.entry, "ax", @progbits
    .globl _start
_start:
    cld
    PUTS msg_hello
    jmp guest_reset

    .section .rodata
msg_hello:
    .asciz "Hello from vmmd test guest\n"
