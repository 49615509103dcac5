//! Detection of the host's QEMU emulators, their version and whether KVM is usable.
