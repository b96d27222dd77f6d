/*
 * incrementer - QEMU a-b-bootblock style migration test guest.  Contract:
 * README.md; the checker is tests/guests/checks.py:check_incrementer_pages.
 *
 * Build-time parameters (as --defsym NAME=VALUE; defaults below):
 *   INC_START        first byte of the range, 4 KiB aligned   (0x400000,  4 MiB)
 *   INC_END          end of the range (exclusive), aligned    (0x4000000, 64 MiB)
 *   PASSES_PER_MARK  full passes between two "B" markers      (see below)
 *
 * 1. Zero the first byte of every 4 KiB page in [INC_START, INC_END).
 * 2. Forever: increment the first byte of every page, lowest page first;
 *    after every PASSES_PER_MARK full passes write one "B" to COM1.
 * Never ends by itself.  Keeps all state in registers (no stores outside
 * the range, apart from the stack during a serial write).
 */
    .include "serial.inc"

    .ifndef INC_START
    .set INC_START, 0x400000
    .endif
    .ifndef INC_END
    .set INC_END, 0x4000000
    .endif
    .ifndef PASSES_PER_MARK
    .set PASSES_PER_MARK, 1024
    .endif

    .if (INC_START & 0xfff) | (INC_END & 0xfff)
    .error "INC_START and INC_END must be 4 KiB aligned"
    .endif
    .if INC_END <= INC_START
    .error "INC_END must be above INC_START"
    .endif
    .if PASSES_PER_MARK < 1
    .error "PASSES_PER_MARK must be at least 1"
    .endif

    .section .text.entry, "ax", @progbits
    .globl _start
_start:
    cld
    movabs $INC_START, %rdi
    movabs $INC_END, %rsi

    /* 1. zero the first byte of every page */
    mov %rdi, %rax
1:  movb $0, (%rax)
    add $4096, %rax
    cmp %rsi, %rax
    jb 1b

    /* 2. increment forever; r8 = passes since the last marker */
    xor %r8d, %r8d
    movabs $PASSES_PER_MARK, %r9
pass:
    mov %rdi, %rax
1:  incb (%rax)
    add $4096, %rax
    cmp %rsi, %rax
    jb 1b
    inc %r8
    cmp %r9, %r8
    jb pass
    xor %r8d, %r8d
    PUTC 'B'
    jmp pass
