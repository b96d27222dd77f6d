/*
 * blkwriter - a guest that writes its virtio-blk disk forever, in passes,
 * for the disk-checkpoint tests (tests/integration/test_snapshot_disks.py).
 *
 * A minimal virtio 1.x PCI driver, polled (no interrupts): it places the
 * function's BAR0 itself, negotiates VERSION_1 and FLUSH, sets up queue 0
 * with QSIZE entries and then, pass after pass (gen = 1, 2, ...), writes
 * sectors i * STRIDE for i in [0, NSECT): each 512-byte sector holds 64
 * copies of the u64 (gen << 32 | sector). One request at a time: it waits
 * for the used ring before the next, so at any moment the disk holds gen
 * in sectors [0, i) and gen - 1 in [i + 1, NSECT) (0: never written), and
 * sector i one of the two. Before each request it stores gen at VARS+0 and
 * i at VARS+8 (RAM a snapshot captures).
 *
 * Prints "BLK READY\n" once set up, "GEN <n>\n" after each pass, "BLK NODEV\n"
 * if slot BLK_SLOT holds no virtio-blk, "BLK IOERR\n" (and stops writing) on
 * a request that fails.
 *
 * Build-time parameters (as --defsym NAME=VALUE; defaults below):
 *   BLK_SLOT  PCI device number on bus 0                      (2)
 *   BAR_ADDR  where BAR0 (16 KiB, mem64) is placed            (0xd0000000)
 *   QBASE     7 pages of guest RAM for rings and buffers      (0x200000)
 *   NSECT     sectors per pass                                 (64)
 *   STRIDE    sectors between two written sectors              (16)
 */
    .include "serial.inc"

    .ifndef BLK_SLOT
    .set BLK_SLOT, 2
    .endif
    .ifndef BAR_ADDR
    .set BAR_ADDR, 0xd0000000
    .endif
    .ifndef QBASE
    .set QBASE, 0x200000
    .endif
    .ifndef NSECT
    .set NSECT, 64
    .endif
    .ifndef STRIDE
    .set STRIDE, 16
    .endif

    .set QSIZE, 8
    .set DESC, QBASE                  /* 3 descriptors used */
    .set AVAIL, QBASE + 0x1000
    .set USED, QBASE + 0x2000
    .set HDR, QBASE + 0x3000          /* struct virtio_blk_req header */
    .set DATA, QBASE + 0x4000         /* one sector */
    .set STAT, QBASE + 0x5000         /* status byte */
    .set VARS, QBASE + 0x6000         /* gen, i */

    /* virtio common config (devices/virtio/pci_transport.py) */
    .set C_DFSELECT, 0x00
    .set C_GFSELECT, 0x08
    .set C_GF, 0x0c
    .set C_STATUS, 0x14
    .set C_QSELECT, 0x16
    .set C_QSIZE, 0x18
    .set C_QMSIX, 0x1a
    .set C_QENABLE, 0x1c
    .set C_QDESC, 0x20
    .set C_QAVAIL, 0x28
    .set C_QUSED, 0x30
    .set NOTIFY, 0x3000

    .set CFG_ADDR, 0x80000000 + (BLK_SLOT << 11)

    .section .text.entry, "ax", @progbits
    .globl _start
_start:
    cld
    /* vendor/device: 0x1af4 / 0x1042 (virtio-blk, modern) */
    mov $CFG_ADDR, %eax
    call cfg_read
    cmp $0x10421af4, %eax
    je 1f
    PUTS msg_nodev
0:  jmp 0b
1:  mov $(CFG_ADDR + 0x10), %eax      /* BAR0 low, BAR1 high */
    mov $BAR_ADDR, %ebx
    call cfg_write
    mov $(CFG_ADDR + 0x14), %eax
    xor %ebx, %ebx
    call cfg_write
    mov $(CFG_ADDR + 0x04), %eax      /* COMMAND: memory space, bus master */
    mov $6, %ebx
    call cfg_write

    movabs $BAR_ADDR, %rbp
    movb $0, C_STATUS(%rbp)            /* reset */
    movb $1, C_STATUS(%rbp)            /* ACKNOWLEDGE */
    movb $3, C_STATUS(%rbp)            /* DRIVER */
    movl $1, C_GFSELECT(%rbp)
    movl $1, C_GF(%rbp)                /* VERSION_1 (bit 32) */
    movl $0, C_GFSELECT(%rbp)
    movl $0x200, C_GF(%rbp)            /* FLUSH (bit 9) */
    movb $0xb, C_STATUS(%rbp)          /* FEATURES_OK */
    movzbl C_STATUS(%rbp), %eax
    test $8, %al
    jnz 2f
    PUTS msg_nodev
0:  jmp 0b
2:  movw $0, C_QSELECT(%rbp)
    movw $QSIZE, C_QSIZE(%rbp)
    movw $0xffff, C_QMSIX(%rbp)
    movl $DESC, C_QDESC(%rbp)
    movl $0, C_QDESC+4(%rbp)
    movl $AVAIL, C_QAVAIL(%rbp)
    movl $0, C_QAVAIL+4(%rbp)
    movl $USED, C_QUSED(%rbp)
    movl $0, C_QUSED+4(%rbp)
    movw $1, C_QENABLE(%rbp)
    movb $0xf, C_STATUS(%rbp)          /* DRIVER_OK */

    /* the chain: header -> data -> status (device-writable) */
    mov $DESC, %edi
    movq $HDR, 0(%rdi)
    movl $16, 8(%rdi)
    movw $1, 12(%rdi)                  /* NEXT */
    movw $1, 14(%rdi)
    movq $DATA, 16(%rdi)
    movl $512, 24(%rdi)
    movw $1, 28(%rdi)
    movw $2, 30(%rdi)
    movq $STAT, 32(%rdi)
    movl $1, 40(%rdi)
    movw $2, 44(%rdi)                  /* WRITE */
    movw $0, 46(%rdi)
    movl $1, HDR                       /* VIRTIO_BLK_T_OUT */
    movl $0, HDR+4
    movw $0, AVAIL                     /* flags */
    movw $0, AVAIL+2                   /* idx */
    PUTS msg_ready

    mov $1, %r12d                      /* gen */
    xor %r14d, %r14d                   /* avail idx */
pass:
    xor %r13d, %r13d                   /* i */
sector:
    mov %r12, VARS
    mov %r13, VARS+8
    mov %r13, %rbx
    imul $STRIDE, %rbx                 /* the sector */
    mov %r12, %rax
    shl $32, %rax
    or %rbx, %rax
    mov $DATA, %edi
    mov $64, %ecx
    rep stosq
    mov %rbx, HDR+8
    movb $0xff, STAT
    mov %r14d, %eax
    and $(QSIZE - 1), %eax
    movw $0, AVAIL+4(,%rax,2)          /* ring[idx % QSIZE] = head 0 */
    inc %r14d
    mfence
    movw %r14w, AVAIL+2
    mfence
    movw $0, NOTIFY(%rbp)              /* kick queue 0 */
3:  pause
    movzwl USED+2, %eax
    cmp %r14w, %ax
    jne 3b
    cmpb $0, STAT
    je 4f
    PUTS msg_ioerr
0:  jmp 0b
4:  inc %r13
    cmp $NSECT, %r13
    jb sector
    PUTS msg_gen
    mov %r12, %rax
    call serial_putdec
    PUTC '\n'
    inc %r12
    jmp pass

/* cfg_read: %eax = config dword at address %eax (mechanism #1). */
cfg_read:
    push %rdx
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfc, %dx
    inl %dx, %eax
    pop %rdx
    ret

/* cfg_write: config dword at address %eax = %ebx. */
cfg_write:
    push %rdx
    push %rax
    mov $0xcf8, %dx
    outl %eax, %dx
    mov %ebx, %eax
    mov $0xcfc, %dx
    outl %eax, %dx
    pop %rax
    pop %rdx
    ret

    .section .rodata
msg_ready:
    .asciz "BLK READY\n"
msg_nodev:
    .asciz "BLK NODEV\n"
msg_ioerr:
    .asciz "BLK IOERR\n"
msg_gen:
    .asciz "GEN "
