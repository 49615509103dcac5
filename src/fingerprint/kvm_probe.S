# Guest program of the KVM probe (see kvm.rs), a multiboot kernel that QEMU loads at 1 MiB.
#
# It walks through the CPU features a Linux boot relies on: 32-bit protected mode, 4-level
# paging, long mode, a page fault handled through the IDT, and timer interrupts from the PIT
# through the 8259 PIC. Then it writes 0x2a to the isa-debug-exit port, so QEMU exits with
# status (0x2a << 1) | 1 = 85.
#
# Assemble: as --64 -o kvm_probe.o kvm_probe.S
#           ld -m elf_x86_64 -Ttext=0x100000 --oformat binary -o kvm_probe.bin kvm_probe.o

        .code32
        .text
        .globl _start
_start:
header:                                 # multiboot header with the address fields (flag 16)
        .long 0x1BADB002
        .long 0x00010000
        .long -(0x1BADB002 + 0x00010000)
        .long header                    # header_addr
        .long header                    # load_addr
        .long 0                         # load_end_addr: the whole file
        .long 0                         # bss_end_addr: no bss
        .long entry                     # entry_addr
entry:
        cli
        # Zero 6 pages at 3 MiB: PML4, PDPT, PD, spare, IDT, tick counter.
        mov $0x300000, %edi
        xor %eax, %eax
        mov $6144, %ecx
        rep stosl
        # Identity-map 0-4 MiB with two 2 MiB pages. 4-6 MiB stays unmapped for the page fault.
        movl $0x301003, 0x300000
        movl $0x302003, 0x301000
        movl $0x000083, 0x302000
        movl $0x200083, 0x302008
        lgdt gdt_desc
        # CR4.PAE, CR3, EFER.LME, then CR0.PG: long mode.
        mov %cr4, %eax
        or $0x20, %eax
        mov %eax, %cr4
        mov $0x300000, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx
        rdmsr
        or $0x100, %eax
        wrmsr
        mov %cr0, %eax
        or $0x80000001, %eax
        mov %eax, %cr0
        ljmp $0x08, $long_entry

        .code64
long_entry:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x2ff000, %esp
        # IDT entry 14 (page fault) at 0x304000.
        mov $0x304000 + 14 * 16, %edi
        mov $pf_handler, %eax
        mov %ax, (%rdi)
        movw $0x08, 2(%rdi)
        movw $0x8E00, 4(%rdi)
        shr $16, %eax
        mov %ax, 6(%rdi)
        lidt idt_desc
        # Touch 4 MiB: the fault handler maps it and the load is retried.
        mov 0x400000, %eax
        # IDT entry 32 (IRQ 0 after the PIC remap).
        mov $0x304000 + 32 * 16, %edi
        mov $timer_handler, %eax
        mov %ax, (%rdi)
        movw $0x08, 2(%rdi)
        movw $0x8E00, 4(%rdi)
        shr $16, %eax
        mov %ax, 6(%rdi)
        # Remap the 8259 PICs to vectors 32-47 and unmask only IRQ 0.
        mov $0x11, %al
        out %al, $0x20
        out %al, $0xA0
        mov $0x20, %al
        out %al, $0x21
        mov $0x28, %al
        out %al, $0xA1
        mov $0x04, %al
        out %al, $0x21
        mov $0x02, %al
        out %al, $0xA1
        mov $0x01, %al
        out %al, $0x21
        out %al, $0xA1
        mov $0xFE, %al
        out %al, $0x21
        mov $0xFF, %al
        out %al, $0xA1
        # PIT channel 0, rate generator, divisor 1193: a tick about every millisecond.
        mov $0x34, %al
        out %al, $0x43
        mov $0xA9, %al
        out %al, $0x40
        mov $0x04, %al
        out %al, $0x40
        # Sleep until three ticks have arrived.
        sti
2:      hlt
        cmpl $3, 0x305000
        jb 2b
        cli
        # Report success through isa-debug-exit.
        mov $0xf4, %dx
        mov $0x2a, %eax
        out %eax, %dx
1:      hlt
        jmp 1b

timer_handler:
        push %rax
        incl 0x305000
        mov $0x20, %al
        out %al, $0x20
        pop %rax
        iretq

pf_handler:
        movl $0x400083, 0x302010        # map 4-6 MiB
        add $8, %rsp                    # drop the error code
        iretq

        .p2align 3
gdt:
        .quad 0
        .quad 0x00209A0000000000        # 64-bit code segment
        .quad 0x0000920000000000        # data segment
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt
idt_desc:
        .word 16 * 33 - 1
        .quad 0x304000
