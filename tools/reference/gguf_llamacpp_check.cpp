// Reads GGUF files with llama.cpp's own C reader (gguf_init_from_file, tensor data loaded) and
// prints what it sees, or REJECTED; exits with the number of files it rejected. The hand
// cross-check of crates/qwen2vl/src/gguf's writer (issue 12); CI has no llama.cpp.
//
// Build against a llama.cpp source tree (no cmake needed; L = its ggml/ directory):
//   printf '#pragma once\n#define GGML_VERSION "0"\n#define GGML_COMMIT "0"\n' > ggml-version.h
//   for f in ggml.c ggml-alloc.c ggml-quants.c; do gcc -O1 -c -std=c11 -D_GNU_SOURCE -I. \
//       -I$L/include -I$L/src $L/src/$f -o $f.o; done
//   for f in ggml.cpp ggml-backend.cpp ggml-backend-meta.cpp ggml-threading.cpp gguf.cpp; do \
//       g++ -O1 -c -std=c++17 -I$L/include -I$L/src $L/src/$f -o $f.o; done
//   g++ -O1 -std=c++17 -I$L/include gguf_llamacpp_check.cpp *.o -o gguf_llamacpp_check -lpthread -lm
// Then, from the repository root:
//   mkdir -p /tmp/ggufdump
//   QWEN2VL_GGUF_DUMP_DIR=/tmp/ggufdump cargo test -p qwen2vl --test gguf round_trips
//   ./gguf_llamacpp_check /tmp/ggufdump/*.gguf tests/fixtures/gguf/*.gguf
#include "ggml.h"
#include "gguf.h"

#include <cstdio>

int main(int argc, char ** argv) {
    int rejected = 0;
    for (int i = 1; i < argc; i++) {
        ggml_context * data = nullptr;
        gguf_init_params params = {/*no_alloc =*/false, /*ctx =*/&data};
        gguf_context * g = gguf_init_from_file(argv[i], params);
        if (g == nullptr) {
            printf("REJECTED %s\n", argv[i]);
            rejected++;
            continue;
        }
        printf("OK %s: version %u, %lld keys, %lld tensors, alignment %zu, data at byte %zu\n", argv[i],
               gguf_get_version(g), (long long) gguf_get_n_kv(g), (long long) gguf_get_n_tensors(g),
               gguf_get_alignment(g), gguf_get_data_offset(g));
        for (int64_t k = 0; k < gguf_get_n_kv(g); k++) {
            printf("  key %s: %s\n", gguf_get_key(g, k), gguf_type_name(gguf_get_kv_type(g, k)));
        }
        for (int64_t t = 0; t < gguf_get_n_tensors(g); t++) {
            const ggml_tensor * x = ggml_get_tensor(data, gguf_get_tensor_name(g, t));
            printf("  tensor %s: %s ne [%lld, %lld, %lld, %lld], %zu bytes at data offset %zu\n",
                   gguf_get_tensor_name(g, t), ggml_type_name(gguf_get_tensor_type(g, t)),
                   (long long) x->ne[0], (long long) x->ne[1], (long long) x->ne[2], (long long) x->ne[3],
                   ggml_nbytes(x), gguf_get_tensor_offset(g, t));
        }
        gguf_free(g);
        ggml_free(data);
    }
    return rejected;
}
