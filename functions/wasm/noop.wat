;; wasm-noop: the interpreted `noop`: returns the runtime's clock when it
;; ran (8 bytes, little endian), like the native `noop`.
(module
  (import "microfaas" "clock_ns" (func $clock_ns (result i64)))
  (import "microfaas" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "handle")
    (i64.store (i32.const 0) (call $clock_ns))
    (call $output_write (i32.const 0) (i32.const 8))))
