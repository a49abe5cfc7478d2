#include "sparrow.h"
#include <stdio.h>
#include <stdlib.h>

static void check(SparrowStatus status) {
    if (status != SPARROW_OK) {
        fprintf(stderr, "sparrow: %s\n", sparrow_last_error());
        exit(1);
    }
}

static int32_t print_text(void *user_data, const char *text, size_t length, int32_t token) {
    (void)user_data, (void)token;
    fwrite(text, 1, length, stdout);
    return 0; /* non-zero stops the generation */
}

int main(int argc, char **argv) { /* usage: example MODEL.gguf ADAPTER */
    if (argc != 3) return 2;
    SparrowModel *model;
    SparrowSession *session;
    SparrowAdapter *adapter;
    check(sparrow_model_open(argv[1], NULL, &model));
    check(sparrow_session_create(model, 0, &session));
    check(sparrow_adapter_load(model, argv[2], &adapter));
    check(sparrow_adapter_apply(model, adapter, 1.0f));
    SparrowGenerateOptions options = sparrow_generate_options_default();
    options.max_tokens = 32;
    check(sparrow_session_generate(session, "Once upon a time", &options, print_text, NULL, NULL));
    check(sparrow_adapter_unapply(model, adapter));
    sparrow_adapter_destroy(adapter);
    sparrow_session_destroy(session);
    sparrow_model_destroy(model);
    return 0;
}
