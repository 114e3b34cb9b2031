//! Our minimal no_std unikernel (filled by the vm backend issue): ring-3 runtime, function ELF loader, request loop, fault reporting.
