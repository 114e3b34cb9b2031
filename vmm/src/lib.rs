//! KVM micro-VMM (filled by the vm backend issue): VM and vCPU setup, guest memory, host<->guest channel, run loop.
