;; wasm-memory-hog: grows its linear memory 1 MiB at a time until the heap
;; limit refuses (out of memory); `unreachable` if growth ever stops for
;; another reason.
(module
  (memory (export "memory") 1)
  (func (export "handle")
    (loop $grow
      (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable))
