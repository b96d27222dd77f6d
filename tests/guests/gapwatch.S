/*
 * gapwatch - a guest that measures its own largest stall, for the migration
 * benchmark (bench/migration.py): guest-observed downtime.
 *
 * Build-time parameters (as --defsym NAME=VALUE; defaults below):
 *   REC     record page (u64 at +0: largest gap between two consecutive
 *           loop iterations in TSC cycles; +8: loop count)   (0x3ff000)
 *   DSTART  first page it dirties                             (0x400000)
 *   DEND    end of the dirtied range (exclusive); DEND == DSTART: none
 *   SPIN    `dec; jnz` iterations between two loop iterations (1000)
 *
 * Forever: read the TSC, keep the largest difference from the previous
 * read, increment the first byte of the next page in [DSTART, DEND)
 * (round robin), spin SPIN times. Prints "G" once at start.
 */
    .include "serial.inc"

    .ifndef REC
    .set REC, 0x3ff000
    .endif
    .ifndef DSTART
    .set DSTART, 0x400000
    .endif
    .ifndef DEND
    .set DEND, 0x400000
    .endif
    .ifndef SPIN
    .set SPIN, 1000
    .endif

    .section .text.entry, "ax", @progbits
    .globl _start
_start:
    cld
    PUTC 'G'
    movabs $REC, %r12
    movq $0, (%r12)
    movq $0, 8(%r12)
    movabs $DSTART, %rdi
    movabs $DEND, %rsi
    mov %rdi, %r13
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r14
loop:
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rcx
    sub %r14, %rcx
    mov %rax, %r14
    cmp (%r12), %rcx
    jbe 1f
    mov %rcx, (%r12)
1:  incq 8(%r12)
    cmp %rsi, %rdi
    jae 3f
    incb (%r13)
    add $4096, %r13
    cmp %rsi, %r13
    jb 3f
    mov %rdi, %r13
3:  movabs $SPIN, %rcx
    test %rcx, %rcx
    jz loop
2:  dec %rcx
    jnz 2b
    jmp loop
