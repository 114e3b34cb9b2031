;; wasm-noop: the interpreted `noop`: returns the runtime's clock when it
;; ran (8 bytes, little endian), like the native `noop`. Its memory is 64
;; bytes (custom-page-sizes: 1-byte pages): a 64 KiB page would be 16 guest
;; pages every fresh instance zeroes, each a first-touch fault in a VM just
;; restored from a snapshot.
(module
  (import "microfaas" "clock_ns" (func $clock_ns (result i64)))
  (import "microfaas" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 64 (pagesize 1))
  (func (export "handle")
    (i64.store (i32.const 0) (call $clock_ns))
    (call $output_write (i32.const 0) (i32.const 8))))
