/*
 * syscall-exp: does SYSCALL / INT / exception delivery from CPL3 reach a CPL0
 * handler for a non-PVM guest?  Booted with vmmd --raw-mode long (CPL0).
 *
 * Parameters (as --defsym):
 *   MODE  0 syscall (EFER.SCE=1), handler sysretq's back
 *         1 syscall with EFER.SCE=0 (expect #UD -> F6)
 *         2 int $0x80 through a DPL3 interrupt gate, handler iretq's back
 *         3 CPL3 write to a supervisor page (expect #PF -> F14 err 7)
 *         4 CPL3 hlt (expect #GP -> F13)
 *         5 CPL3 ud2 (expect #UD -> F6)
 *   KUSER 1: kernel pages (code, IDT, page tables, kernel stack) user-accessible too
 *
 * Fixed layout (one section, .org):
 *   0x100000-0x101fff kernel code        (supervisor unless KUSER)
 *   0x102000          user code          (user)
 *   0x103000 PML4, 0x104000 PDPT, 0x105000 PD, 0x106000 PT (4 KiB pages over [0,2M))
 *   0x107000 IDT, 0x108000-0x108fff kernel stack (top 0x109000)
 *   0x109000-0x109fff user stack (top 0x10a000)
 */
    .ifndef MODE
    .set MODE, 0
    .endif
    .ifndef KUSER
    .set KUSER, 0
    .endif

    .set BASE, 0x100000
    .set USER_CODE, 0x102000
    .set PML4, 0x103000
    .set PDPT, 0x104000
    .set PD,   0x105000
    .set PT,   0x106000
    .set IDT,  0x107000
    .set KSTACK_TOP, 0x109000
    .set USTACK_TOP, 0x10a000
    .set TSS_ADDR, 0x580
    .set KCS, 0x10
    .set UDS, 0x23
    .set UCS, 0x2b

    .code64
    .section .text.entry, "awx", @progbits
    .globl _start
_start:
    cld
    mov $KSTACK_TOP, %rsp
    mov $'K', %al
    call kputc
    mov $'0', %al
    call kputc
    /* own page tables */
    mov $PML4, %rax
    mov %rax, %cr3
    /* IDT: vectors 0-31 -> stubs (DPL0 interrupt gates), 0x80 -> DPL3 gate */
    mov $IDT, %rdi
    lea isr_base(%rip), %rax
    mov $0x8e, %dl
    mov $32, %ecx
1:  call set_gate
    add $16, %rax
    add $16, %rdi
    loop 1b
    mov $(IDT + 0x80*16), %rdi
    lea int80_handler(%rip), %rax
    mov $0xee, %dl
    call set_gate
    lidt idtr(%rip)
    /* TSS.RSP0 */
    mov $KSTACK_TOP, %rax
    mov %rax, TSS_ADDR + 4
    /* EFER.SCE */
    mov $0xc0000080, %ecx
    rdmsr
    .if MODE == 1
    and $~1, %eax
    .else
    or $1, %eax
    .endif
    wrmsr
    /* STAR: syscall CS=0x10 SS=0x18; sysret base 0x18 -> SS=0x23, CS=0x2b */
    mov $0xc0000081, %ecx
    xor %eax, %eax
    mov $0x00180010, %edx
    wrmsr
    /* LSTAR */
    mov $0xc0000082, %ecx
    lea syscall_handler(%rip), %rax
    xor %edx, %edx
    wrmsr
    /* SFMASK: clear IF */
    mov $0xc0000084, %ecx
    mov $0x200, %eax
    xor %edx, %edx
    wrmsr
    /* to CPL3 */
    pushq $UDS
    pushq $USTACK_TOP
    pushq $0x3002
    pushq $UCS
    pushq $USER_CODE
    iretq

/* set_gate: rdi = entry, rax = handler, dl = type/attr */
set_gate:
    push %rbx
    mov %ax, (%rdi)
    movw $KCS, 2(%rdi)
    movb $0, 4(%rdi)
    movb %dl, 5(%rdi)
    mov %rax, %rbx
    shr $16, %rbx
    mov %bx, 6(%rdi)
    shr $16, %rbx
    mov %ebx, 8(%rdi)
    movl $0, 12(%rdi)
    pop %rbx
    ret

kputc:
    push %rdx
    push %rax
    mov $0x3fd, %dx
1:  inb %dx, %al
    test $0x20, %al
    jz 1b
    pop %rax
    mov $0x3f8, %dx
    outb %al, %dx
    pop %rdx
    ret

/* kputhex: %rax as hex, 16 digits */
kputhex:
    push %rax
    push %rcx
    push %rdx
    mov %rax, %rdx
    mov $16, %ecx
1:  rol $4, %rdx
    mov %dl, %al
    and $0xf, %al
    cmp $10, %al
    jb 2f
    add $('a' - '0' - 10), %al
2:  add $'0', %al
    call kputc
    loop 1b
    pop %rdx
    pop %rcx
    pop %rax
    ret

kputcpl:
    push %rax
    mov %cs, %ax
    and $3, %al
    add $'0', %al
    call kputc
    pop %rax
    ret

kreset:
    mov $'\n', %al
    call kputc
    mov $0xcf9, %dx
    mov $0x06, %al
    outb %al, %dx
1:  hlt
    jmp 1b

/* SYSCALL entry (LSTAR) */
syscall_handler:
    mov %rsp, %r12          /* user rsp */
    mov $(KSTACK_TOP - 0x200), %rsp
    mov $'S', %al
    call kputc
    call kputcpl
    mov $' ', %al
    call kputc
    mov $'c', %al
    call kputc
    mov $'s', %al
    call kputc
    mov $'=', %al
    call kputc
    xor %eax, %eax
    mov %cs, %ax
    call kputhex
    mov $' ', %al
    call kputc
    mov $'r', %al
    call kputc
    mov $'c', %al
    call kputc
    mov $'x', %al
    call kputc
    mov $'=', %al
    call kputc
    mov %rcx, %rax
    call kputhex
    mov $' ', %al
    call kputc
    mov $'r', %al
    call kputc
    mov $'1', %al
    call kputc
    call kputc
    mov $'=', %al
    call kputc
    mov %r11, %rax
    call kputhex
    mov $' ', %al
    call kputc
    mov $'f', %al
    call kputc
    mov $'l', %al
    call kputc
    mov $'=', %al
    call kputc
    pushfq
    pop %rax
    call kputhex
    mov $' ', %al
    call kputc
    lea user_after_syscall(%rip), %rax
    cmp %rax, %rcx
    jne 1f
    mov $'o', %al
    call kputc
    mov $'k', %al
    call kputc
    jmp 2f
1:  mov $'B', %al
    call kputc
    mov $'A', %al
    call kputc
    mov $'D', %al
    call kputc
2:  mov $'\n', %al
    call kputc
    mov %r12, %rsp
    sysretq

/* int $0x80 (DPL3 gate) */
int80_handler:
    mov $'I', %al
    call kputc
    call kputcpl
    mov $' ', %al
    call kputc
    mov 8(%rsp), %rax       /* interrupted CS */
    call kputhex
    mov $' ', %al
    call kputc
    mov (%rsp), %rax        /* interrupted RIP */
    call kputhex
    mov $' ', %al
    call kputc
    mov 24(%rsp), %rax      /* interrupted RSP */
    call kputhex
    mov $' ', %al
    call kputc
    mov %rsp, %rax          /* handler RSP (should be near TSS.RSP0) */
    call kputhex
    mov $'\n', %al
    call kputc
    iretq

/* exception stubs: [vector][error] on the stack */
    .balign 16
isr_base:
    .set v, 0
    .rept 32
    .balign 16
    .if (v == 8) || (v == 10) || (v == 11) || (v == 12) || (v == 13) || (v == 14) || (v == 17) || (v == 21) || (v == 29) || (v == 30)
    .else
    pushq $0
    .endif
    pushq $v
    jmp fault_common
    .set v, v + 1
    .endr

/* stack: vec, err, rip, cs, rflags, rsp, ss */
fault_common:
    mov $'F', %al
    call kputc
    mov (%rsp), %rax
    call kputhex
    mov $' ', %al
    call kputc
    mov $'c', %al
    call kputc
    mov $'p', %al
    call kputc
    mov $'l', %al
    call kputc
    call kputcpl
    mov $' ', %al
    call kputc
    mov $'e', %al
    call kputc
    mov 8(%rsp), %rax
    call kputhex
    mov $' ', %al
    call kputc
    mov $'r', %al
    call kputc
    mov 16(%rsp), %rax
    call kputhex
    mov $' ', %al
    call kputc
    mov $'c', %al
    call kputc
    mov 24(%rsp), %rax
    call kputhex
    mov $' ', %al
    call kputc
    mov $'s', %al
    call kputc
    mov 40(%rsp), %rax
    call kputhex
    mov $' ', %al
    call kputc
    mov $'a', %al
    call kputc
    mov %cr2, %rax
    call kputhex
    mov $' ', %al
    call kputc
    mov $'k', %al
    call kputc
    mov %rsp, %rax
    call kputhex
    jmp kreset

idtr:
    .word 256*16 - 1
    .quad IDT

/* ---------------- user code (CPL3, native) ---------------- */
    .org USER_CODE - BASE
user_entry:
    mov $'U', %al
    call uputc
    mov %cs, %ax
    and $3, %al
    add $'0', %al
    call uputc
    .ifdef UDEBUG
    mov $' ', %al
    call uputc
    xor %eax, %eax
    mov %cs, %ax
    call uputhex
    mov $' ', %al
    call uputc
    pushfq
    pop %rax
    call uputhex
    .endif
    mov $'\n', %al
    call uputc
    mov $0x1111, %rcx
    mov $0x2222, %r11
    .if (MODE == 0) || (MODE == 1)
    syscall
    .globl user_after_syscall
user_after_syscall:
    .elseif MODE == 2
    int $0x80
user_after_syscall:
    .elseif MODE == 3
user_after_syscall:
    movb $1, BASE
    .elseif MODE == 4
user_after_syscall:
    hlt
    .else
user_after_syscall:
    ud2
    .endif
    mov $'B', %al
    call uputc
    mov %cs, %ax
    and $3, %al
    add $'0', %al
    call uputc
    mov $'\n', %al
    call uputc
    mov $0xcf9, %dx
    mov $0x06, %al
    outb %al, %dx
1:  pause
    jmp 1b

uputhex:
    push %rax
    push %rcx
    push %rdx
    mov %rax, %rdx
    mov $16, %ecx
1:  rol $4, %rdx
    mov %dl, %al
    and $0xf, %al
    cmp $10, %al
    jb 2f
    add $('a' - '0' - 10), %al
2:  add $'0', %al
    call uputc
    loop 1b
    pop %rdx
    pop %rcx
    pop %rax
    ret
uputc:
    push %rdx
    push %rax
    mov $0x3fd, %dx
1:  inb %dx, %al
    test $0x20, %al
    jz 1b
    pop %rax
    mov $0x3f8, %dx
    outb %al, %dx
    pop %rdx
    ret

/* ---------------- page tables ---------------- */
    .org PML4 - BASE
    .quad PDPT | 7
    .fill 511, 8, 0
    .org PDPT - BASE
    .quad PD | 7
    .fill 511, 8, 0
    .org PD - BASE
    .quad PT | 7
    .fill 511, 8, 0
    .org PT - BASE
    .set pg, 0
    .rept 512
    .if (pg == 0x102) || (pg == 0x109) || KUSER
    .quad (pg << 12) | 7
    .else
    .quad (pg << 12) | 3
    .endif
    .set pg, pg + 1
    .endr
    .org IDT - BASE
    .fill 4096, 1, 0
    .fill 4096, 1, 0      /* kernel stack */
    .fill 4096, 1, 0      /* user stack */
