/*
 * The C client of sparrow's C ABI: the whole flow an app goes through, and every error path.
 * Built and run by ffi/tests/c_client.rs (plain, and under valgrind).
 *
 *   client MODEL_F32 MODEL_Q8 MODEL_QWEN LORA_GGUF SHIRA_DIR NOT_A_MODEL
 *
 * MODEL_F32 and MODEL_Q8 are the tiny llama of tests/fixtures/tiny, MODEL_QWEN a model the
 * adapters do not fit, LORA_GGUF and SHIRA_DIR adapters made for the tiny llama, NOT_A_MODEL
 * a file that is not GGUF. Prints "greedy: ID ID ..." lines for the Rust side to compare
 * with the runtime, and "ok" at the end; exits 1 at the first failed check.
 */
#include "sparrow.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks = 0;

#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        checks++;                                                                         \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "%s:%d: check failed: %s\n  ", __FILE__, __LINE__, #cond);    \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fprintf(stderr, "\n  last error: %s\n", sparrow_last_error());                \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

/* A call that must return `want`, with a message from sparrow_last_error when it fails. */
#define EXPECT(want, call)                                                                \
    do {                                                                                  \
        SparrowStatus got_ = (call);                                                      \
        CHECK(got_ == (want), "%s returned %d, expected %d", #call, (int)got_, (int)(want)); \
        if ((want) != SPARROW_OK)                                                         \
            CHECK(strlen(sparrow_last_error()) > 0, "%s failed without a message", #call); \
        else                                                                              \
            CHECK(sparrow_last_error()[0] == 0, "%s succeeded but left an error", #call); \
    } while (0)

#define MAX_TOKENS 64

/* What a generation streamed. */
typedef struct {
    int ids[MAX_TOKENS];
    int n_ids;
    char text[4096];
    size_t text_len;
    int final_calls;   /* calls with token -1 */
    int stop_after;    /* return 1 after this many tokens (0: never) */
    int cancel_after;  /* call sparrow_session_cancel after this many tokens (0: never) */
    SparrowSession *session;
    SparrowModel *model;
    int reentry_checked;
} Stream;

static int32_t on_token(void *user_data, const char *text, size_t length, int32_t token) {
    Stream *s = user_data;
    CHECK(text != NULL && text[length] == 0, "callback text is not NUL-terminated");
    CHECK(s->text_len + length < sizeof s->text, "stream overflow");
    memcpy(s->text + s->text_len, text, length);
    s->text_len += length;
    s->text[s->text_len] = 0;
    if (token < 0) {
        s->final_calls++;
        return 0;
    }
    CHECK(s->final_calls == 0, "token after the final call");
    CHECK(s->n_ids < MAX_TOKENS, "more tokens than max_tokens");
    s->ids[s->n_ids++] = token;
    if (s->model && !s->reentry_checked) {
        /* Inside the callback the model is busy; tokenizing is allowed. */
        SparrowAdapter *none = NULL;
        size_t n = 0;
        EXPECT(SPARROW_ERR_BUSY, sparrow_adapter_unapply_all(s->model));
        EXPECT(SPARROW_ERR_BUSY, sparrow_session_reset(s->session));
        EXPECT(SPARROW_ERR_BUSY, sparrow_session_generate(s->session, "x", NULL, NULL, NULL, NULL));
        EXPECT(SPARROW_ERR_BUSY, sparrow_adapter_load(s->model, "/nonexistent", &none));
        EXPECT(SPARROW_ERR_BUFFER_TOO_SMALL, sparrow_tokenize(s->model, "hi", false, false, NULL, 0, &n));
        CHECK(n > 0, "tokenize in a callback");
        s->reentry_checked = 1;
    }
    if (s->cancel_after && s->n_ids == s->cancel_after)
        EXPECT(SPARROW_OK, sparrow_session_cancel(s->session));
    return s->stop_after && s->n_ids >= s->stop_after;
}

static SparrowGenerateOptions greedy(uint32_t max_tokens) {
    SparrowGenerateOptions o = sparrow_generate_options_default();
    o.temperature = 0.0f;
    o.max_tokens = max_tokens;
    o.stop_at_eog = false;
    return o;
}

static void print_ids(const char *label, const Stream *s) {
    printf("%s:", label);
    for (int i = 0; i < s->n_ids; i++) printf(" %d", s->ids[i]);
    printf("\n");
}

/* Greedy generation of `n` tokens after `prompt` in a reset session. */
static Stream run_greedy(SparrowSession *session, const char *prompt, uint32_t n) {
    Stream s;
    memset(&s, 0, sizeof s);
    SparrowGenerateOptions o = greedy(n);
    SparrowGenerateResult r;
    EXPECT(SPARROW_OK, sparrow_session_reset(session));
    EXPECT(SPARROW_OK, sparrow_session_generate(session, prompt, &o, on_token, &s, &r));
    CHECK(r.stop_reason == SPARROW_STOP_MAX_TOKENS, "stop reason %d", r.stop_reason);
    CHECK(r.generated_tokens == n && s.n_ids == (int)n, "%u tokens, %d streamed", r.generated_tokens, s.n_ids);
    return s;
}

static int same_ids(const Stream *a, const Stream *b) {
    return a->n_ids == b->n_ids && memcmp(a->ids, b->ids, sizeof(int) * a->n_ids) == 0;
}

/* --- cancel from another thread ----------------------------------------------------- */

typedef struct {
    SparrowSession *session;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started, cancelled;
    int n_ids;
} CancelCtx;

static int32_t wait_for_cancel(void *user_data, const char *text, size_t length, int32_t token) {
    (void)text;
    (void)length;
    CancelCtx *c = user_data;
    if (token < 0) return 0;
    c->n_ids++;
    pthread_mutex_lock(&c->mu);
    c->started = 1;
    pthread_cond_broadcast(&c->cv);
    while (!c->cancelled) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static void *canceller(void *arg) {
    CancelCtx *c = arg;
    pthread_mutex_lock(&c->mu);
    while (!c->started) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    /* The session is busy with the other thread's generation. */
    EXPECT(SPARROW_ERR_BUSY, sparrow_session_generate(c->session, "x", NULL, NULL, NULL, NULL));
    EXPECT(SPARROW_ERR_BUSY, sparrow_session_reset(c->session));
    EXPECT(SPARROW_OK, sparrow_session_cancel(c->session));
    pthread_mutex_lock(&c->mu);
    c->cancelled = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: client MODEL_F32 MODEL_Q8 MODEL_QWEN LORA_GGUF SHIRA_DIR NOT_A_MODEL\n");
        return 2;
    }
    const char *model_f32 = argv[1], *model_q8 = argv[2], *model_qwen = argv[3];
    const char *lora_path = argv[4], *shira_path = argv[5], *not_a_model = argv[6];

    CHECK(strlen(sparrow_version()) > 0, "empty version");

    /* --- opening: every way to fail first ------------------------------------------- */
    SparrowModel *model = (SparrowModel *)1;
    EXPECT(SPARROW_ERR_IO, sparrow_model_open("/nonexistent/model.gguf", NULL, &model));
    CHECK(model == NULL, "a failed open leaves *model NULL");
    CHECK(strstr(sparrow_last_error(), "/nonexistent/model.gguf") != NULL, "the message names the path");
    EXPECT(SPARROW_ERR_MODEL, sparrow_model_open(not_a_model, NULL, &model));
    EXPECT(SPARROW_ERR_NULL, sparrow_model_open(NULL, NULL, &model));
    EXPECT(SPARROW_ERR_NULL, sparrow_model_open(model_f32, NULL, NULL));
    EXPECT(SPARROW_ERR_INVALID_ARGUMENT, sparrow_model_open("\xff\xfe.gguf", NULL, &model));
    SparrowModelOptions mo = sparrow_model_options_default();
    mo.backend = SPARROW_BACKEND_GPU;
    EXPECT(SPARROW_ERR_UNSUPPORTED, sparrow_model_open(model_f32, &mo, &model));
    mo.backend = 42;
    EXPECT(SPARROW_ERR_INVALID_ARGUMENT, sparrow_model_open(model_f32, &mo, &model));
    CHECK(model == NULL, "no model after failures");

    mo = sparrow_model_options_default();
    mo.n_threads = 2;
    mo.n_ctx = 128;
    EXPECT(SPARROW_OK, sparrow_model_open(model_f32, &mo, &model));
    CHECK(model != NULL, "model handle");

    /* --- tokens --------------------------------------------------------------------- */
    /* Ids from the model's own tokenizer in transformers (tests/fixtures/tiny/index.json). */
    const char *text = "The little bird sang a song to the sun.";
    const uint32_t want_ids[] = {316, 278, 283, 450, 366, 267, 298, 259, 267, 269, 73, 348, 262, 352, 16};
    const size_t n_want = sizeof want_ids / sizeof want_ids[0];
    size_t n = 0;
    EXPECT(SPARROW_ERR_BUFFER_TOO_SMALL, sparrow_tokenize(model, text, false, false, NULL, 0, &n));
    CHECK(n == n_want, "size query: %zu tokens", n);
    uint32_t ids[64];
    EXPECT(SPARROW_OK, sparrow_tokenize(model, text, false, false, ids, 64, &n));
    CHECK(n == n_want && memcmp(ids, want_ids, sizeof want_ids) == 0, "token ids differ from transformers'");
    EXPECT(SPARROW_OK, sparrow_tokenize(model, text, true, false, ids, 64, &n));
    /* This model's metadata asks for no BOS (byte-level BPE without add_bos_token), as
     * llama.cpp reads it. */
    CHECK(n == n_want && ids[0] == want_ids[0], "add_special adds nothing here: %zu tokens, first %u", n, ids[0]);
    EXPECT(SPARROW_OK, sparrow_tokenize(model, "<|im_start|>", false, true, ids, 64, &n));
    CHECK(n == 1 && ids[0] == 1, "parse_special: <|im_start|> is token 1");
    EXPECT(SPARROW_OK, sparrow_tokenize(model, "", false, false, NULL, 0, &n));
    CHECK(n == 0, "empty text has no tokens");

    char buf[256];
    size_t len = 0;
    EXPECT(SPARROW_ERR_BUFFER_TOO_SMALL, sparrow_detokenize(model, want_ids, n_want, buf, 4, &len));
    CHECK(len == strlen(text), "detokenize size query: %zu", len);
    EXPECT(SPARROW_ERR_BUFFER_TOO_SMALL, sparrow_detokenize(model, want_ids, n_want, buf, len, &len));
    EXPECT(SPARROW_OK, sparrow_detokenize(model, want_ids, n_want, buf, sizeof buf, &len));
    CHECK(strcmp(buf, text) == 0, "round trip: '%s'", buf);
    const uint32_t bad_id[] = {512};
    EXPECT(SPARROW_ERR_INVALID_ARGUMENT, sparrow_detokenize(model, bad_id, 1, buf, sizeof buf, &len));
    EXPECT(SPARROW_ERR_NULL, sparrow_detokenize(model, NULL, 3, buf, sizeof buf, &len));
    EXPECT(SPARROW_ERR_NULL, sparrow_tokenize(model, NULL, false, false, ids, 64, &n));
    EXPECT(SPARROW_ERR_NULL, sparrow_tokenize(model, text, false, false, ids, 64, NULL));
    EXPECT(SPARROW_ERR_NULL, sparrow_tokenize(model, text, false, false, NULL, 64, &n));

    /* --- generation ----------------------------------------------------------------- */
    SparrowSession *session = NULL;
    EXPECT(SPARROW_OK, sparrow_session_create(model, 0, &session));
    const char *prompt = "The little bird";
    Stream base = run_greedy(session, prompt, 12);
    print_ids("greedy", &base);
    EXPECT(SPARROW_OK, sparrow_detokenize(model, (const uint32_t *)base.ids, base.n_ids, buf, sizeof buf, &len));
    CHECK(strcmp(buf, base.text) == 0, "streamed text '%s' differs from the detokenized ids '%s'", base.text, buf);
    Stream again = run_greedy(session, prompt, 12);
    CHECK(same_ids(&base, &again), "greedy generation is not repeatable");

    /* Continuing a conversation: the second call starts where the first stopped. */
    {
        Stream s1, s2;
        memset(&s1, 0, sizeof s1);
        memset(&s2, 0, sizeof s2);
        SparrowGenerateOptions o = greedy(6);
        EXPECT(SPARROW_OK, sparrow_session_reset(session));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, prompt, &o, on_token, &s1, NULL));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, " and", &o, on_token, &s2, NULL));
        CHECK(s1.n_ids == 6 && s2.n_ids == 6, "two turns of 6 tokens");
    }

    /* Sampling with a seed is repeatable too. */
    {
        Stream a, b;
        memset(&a, 0, sizeof a);
        memset(&b, 0, sizeof b);
        SparrowGenerateOptions o = sparrow_generate_options_default();
        o.max_tokens = 10;
        o.stop_at_eog = false;
        o.seed = 7;
        EXPECT(SPARROW_OK, sparrow_session_reset(session));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, prompt, &o, on_token, &a, NULL));
        EXPECT(SPARROW_OK, sparrow_session_reset(session));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, prompt, &o, on_token, &b, NULL));
        CHECK(same_ids(&a, &b), "seeded sampling is not repeatable");
    }

    /* Cancel by the callback's return value. */
    {
        Stream s;
        memset(&s, 0, sizeof s);
        s.stop_after = 3;
        SparrowGenerateOptions o = greedy(12);
        SparrowGenerateResult r;
        EXPECT(SPARROW_OK, sparrow_session_reset(session));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, prompt, &o, on_token, &s, &r));
        CHECK(r.stop_reason == SPARROW_STOP_CANCELLED && s.n_ids == 3 && r.generated_tokens == 3,
              "callback cancel: reason %d after %d tokens", r.stop_reason, s.n_ids);
        CHECK(s.final_calls == 0, "no final call after a cancel");
    }
    /* Cancel with sparrow_session_cancel from inside the callback, with re-entry checks. */
    {
        Stream s;
        memset(&s, 0, sizeof s);
        s.cancel_after = 4;
        s.session = session;
        s.model = model;
        SparrowGenerateOptions o = greedy(12);
        SparrowGenerateResult r;
        EXPECT(SPARROW_OK, sparrow_session_reset(session));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, prompt, &o, on_token, &s, &r));
        CHECK(r.stop_reason == SPARROW_STOP_CANCELLED && s.n_ids == 4, "explicit cancel: reason %d after %d tokens",
              r.stop_reason, s.n_ids);
        CHECK(s.reentry_checked, "re-entry checks ran");
        /* The cancel was consumed: the next generation runs in full. */
        Stream t = run_greedy(session, prompt, 12);
        CHECK(same_ids(&t, &base), "generation after a cancel");
    }
    /* A cancel with no generation running stops the next one before its first token. */
    {
        Stream s;
        memset(&s, 0, sizeof s);
        SparrowGenerateOptions o = greedy(12);
        SparrowGenerateResult r;
        EXPECT(SPARROW_OK, sparrow_session_reset(session));
        EXPECT(SPARROW_OK, sparrow_session_cancel(session));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, prompt, &o, on_token, &s, &r));
        CHECK(r.stop_reason == SPARROW_STOP_CANCELLED && s.n_ids == 0, "pending cancel: reason %d, %d tokens",
              r.stop_reason, s.n_ids);
    }
    /* Cancel from another thread, while the generation runs. */
    {
        CancelCtx c;
        memset(&c, 0, sizeof c);
        c.session = session;
        pthread_mutex_init(&c.mu, NULL);
        pthread_cond_init(&c.cv, NULL);
        pthread_t th;
        CHECK(pthread_create(&th, NULL, canceller, &c) == 0, "pthread_create");
        SparrowGenerateOptions o = greedy(40);
        SparrowGenerateResult r;
        EXPECT(SPARROW_OK, sparrow_session_reset(session));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, prompt, &o, wait_for_cancel, &c, &r));
        pthread_join(th, NULL);
        CHECK(r.stop_reason == SPARROW_STOP_CANCELLED && c.n_ids == 1, "cross-thread cancel: reason %d after %d",
              r.stop_reason, c.n_ids);
        pthread_mutex_destroy(&c.mu);
        pthread_cond_destroy(&c.cv);
    }

    /* Generation errors. */
    /* An empty prompt continues after the last generation; in an empty session it is an
     * error. */
    {
        SparrowGenerateOptions o = greedy(3);
        SparrowGenerateResult r;
        EXPECT(SPARROW_OK, sparrow_session_reset(session));
        EXPECT(SPARROW_ERR_INVALID_ARGUMENT, sparrow_session_generate(session, "", &o, NULL, NULL, NULL));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, prompt, &o, NULL, NULL, &r));
        EXPECT(SPARROW_OK, sparrow_session_generate(session, "", &o, NULL, NULL, &r));
        CHECK(r.prompt_tokens == 1 && r.generated_tokens == 3, "continuation: %u prompt tokens", r.prompt_tokens);
    }
    EXPECT(SPARROW_ERR_INVALID_ARGUMENT, sparrow_session_generate(session, "bad \xc3\x28 utf8", NULL, NULL, NULL, NULL));
    EXPECT(SPARROW_ERR_NULL, sparrow_session_generate(session, NULL, NULL, NULL, NULL, NULL));
    {
        SparrowGenerateOptions o = greedy(4);
        o.top_p = 2.0f;
        EXPECT(SPARROW_ERR_INVALID_ARGUMENT, sparrow_session_generate(session, prompt, &o, NULL, NULL, NULL));
        o = greedy(4);
        o.chat = true; /* the tiny model has no chat template */
        EXPECT(SPARROW_ERR_UNSUPPORTED, sparrow_session_generate(session, prompt, &o, NULL, NULL, NULL));
    }
    {
        SparrowSession *small = NULL;
        EXPECT(SPARROW_OK, sparrow_session_create(model, 8, &small));
        EXPECT(SPARROW_ERR_CONTEXT_FULL, sparrow_session_generate(small, text, NULL, NULL, NULL, NULL));
        SparrowGenerateOptions o = greedy(40);
        SparrowGenerateResult r;
        EXPECT(SPARROW_OK, sparrow_session_generate(small, "The", &o, NULL, NULL, &r));
        CHECK(r.stop_reason == SPARROW_STOP_CONTEXT_FULL, "a small context fills: reason %d", r.stop_reason);
        EXPECT(SPARROW_OK, sparrow_session_destroy(small));
    }

    /* --- adapters ------------------------------------------------------------------- */
    SparrowAdapter *lora = NULL, *shira = NULL, *bad = (SparrowAdapter *)1;
    EXPECT(SPARROW_ERR_IO, sparrow_adapter_load(model, "/nonexistent/adapter.gguf", &bad));
    CHECK(bad == NULL, "a failed load leaves *adapter NULL");
    EXPECT(SPARROW_ERR_ADAPTER, sparrow_adapter_load(model, not_a_model, &bad));
    EXPECT(SPARROW_OK, sparrow_adapter_load(model, lora_path, &lora));
    EXPECT(SPARROW_OK, sparrow_adapter_load(model, shira_path, &shira));

    EXPECT(SPARROW_OK, sparrow_adapter_apply(model, lora, 1.0f));
    Stream with_lora = run_greedy(session, prompt, 12);
    print_ids("greedy+lora", &with_lora);
    EXPECT(SPARROW_ERR_ADAPTER, sparrow_adapter_apply(model, lora, 1.0f)); /* already applied */
    EXPECT(SPARROW_ERR_INVALID_ARGUMENT, sparrow_adapter_apply(model, shira, 0.0f / 0.0f));
    EXPECT(SPARROW_OK, sparrow_adapter_apply(model, shira, 1.0f));
    Stream with_both = run_greedy(session, prompt, 12);
    print_ids("greedy+lora+shira", &with_both);
    SparrowAdapter *applied[4];
    EXPECT(SPARROW_ERR_BUFFER_TOO_SMALL, sparrow_model_applied_adapters(model, applied, 1, &n));
    EXPECT(SPARROW_OK, sparrow_model_applied_adapters(model, applied, 4, &n));
    CHECK(n == 2 && applied[0] == lora && applied[1] == shira, "applied: %zu", n);
    EXPECT(SPARROW_ERR_ADAPTER, sparrow_adapter_unapply(model, lora)); /* not the last applied */
    EXPECT(SPARROW_OK, sparrow_adapter_unapply(model, shira));
    Stream back = run_greedy(session, prompt, 12);
    CHECK(same_ids(&back, &with_lora), "unapplying shira gives the lora output back");
    EXPECT(SPARROW_ERR_ADAPTER, sparrow_adapter_unapply(model, shira)); /* not applied */
    EXPECT(SPARROW_OK, sparrow_adapter_switch(model, lora, shira, 1.0f));
    Stream with_shira = run_greedy(session, prompt, 12);
    print_ids("greedy+shira", &with_shira);
    EXPECT(SPARROW_OK, sparrow_model_applied_adapters(model, applied, 4, &n));
    CHECK(n == 1 && applied[0] == shira, "after the switch, only shira");
    EXPECT(SPARROW_OK, sparrow_adapter_set_scale(model, shira, 0.0f));
    Stream zero = run_greedy(session, prompt, 12);
    CHECK(same_ids(&zero, &base), "an adapter at scale 0 changes nothing");
    EXPECT(SPARROW_OK, sparrow_adapter_set_scale(model, shira, 1.0f));
    Stream shira_again = run_greedy(session, prompt, 12);
    CHECK(same_ids(&shira_again, &with_shira), "scale back to 1");
    EXPECT(SPARROW_ERR_ADAPTER, sparrow_adapter_set_scale(model, lora, 2.0f)); /* not applied */
    EXPECT(SPARROW_OK, sparrow_adapter_unapply_all(model));
    EXPECT(SPARROW_OK, sparrow_model_applied_adapters(model, NULL, 0, &n));
    CHECK(n == 0, "nothing applied after unapply_all");
    Stream restored = run_greedy(session, prompt, 12);
    CHECK(same_ids(&restored, &base), "unapply_all restores the base output");

    /* Wrong adapters: one loaded for another model, one that does not fit. */
    SparrowModel *other = NULL, *qwen = NULL;
    SparrowAdapter *other_lora = NULL;
    EXPECT(SPARROW_OK, sparrow_model_open(model_q8, NULL, &other));
    EXPECT(SPARROW_OK, sparrow_adapter_load(other, lora_path, &other_lora));
    EXPECT(SPARROW_ERR_ADAPTER, sparrow_adapter_apply(model, other_lora, 1.0f));
    EXPECT(SPARROW_ERR_ADAPTER, sparrow_adapter_switch(model, lora, other_lora, 1.0f));
    EXPECT(SPARROW_OK, sparrow_model_open(model_qwen, NULL, &qwen));
    EXPECT(SPARROW_ERR_ADAPTER, sparrow_adapter_load(qwen, lora_path, &bad));
    CHECK(bad == NULL, "a refused adapter leaves *adapter NULL");
    /* The adapter of the other model works there. */
    EXPECT(SPARROW_OK, sparrow_adapter_apply(other, other_lora, 1.0f));

    /* --- null, destroyed and wrong-kind handles --------------------------------------- */
    {
        SparrowSession *none = (SparrowSession *)1;
        EXPECT(SPARROW_ERR_NULL, sparrow_session_create(NULL, 0, &none));
        CHECK(none == NULL, "a failed create leaves *session NULL");
        EXPECT(SPARROW_ERR_NULL, sparrow_session_create(model, 0, NULL));
    }
    EXPECT(SPARROW_ERR_NULL, sparrow_session_generate(NULL, prompt, NULL, NULL, NULL, NULL));
    EXPECT(SPARROW_ERR_NULL, sparrow_session_reset(NULL));
    EXPECT(SPARROW_ERR_NULL, sparrow_session_cancel(NULL));
    EXPECT(SPARROW_ERR_NULL, sparrow_tokenize(NULL, text, false, false, ids, 64, &n));
    EXPECT(SPARROW_ERR_NULL, sparrow_detokenize(NULL, ids, 1, buf, sizeof buf, &len));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_load(NULL, lora_path, &bad));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_load(model, NULL, &bad));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_load(model, lora_path, NULL));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_apply(NULL, lora, 1.0f));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_apply(model, NULL, 1.0f));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_unapply(model, NULL));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_switch(model, NULL, lora, 1.0f));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_switch(model, lora, NULL, 1.0f));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_set_scale(model, NULL, 1.0f));
    EXPECT(SPARROW_ERR_NULL, sparrow_adapter_unapply_all(NULL));
    EXPECT(SPARROW_ERR_NULL, sparrow_model_applied_adapters(NULL, applied, 4, &n));
    EXPECT(SPARROW_ERR_NULL, sparrow_model_applied_adapters(model, applied, 4, NULL));
    EXPECT(SPARROW_OK, sparrow_model_destroy(NULL));
    EXPECT(SPARROW_OK, sparrow_session_destroy(NULL));
    EXPECT(SPARROW_OK, sparrow_adapter_destroy(NULL));

    /* Wrong kinds: a session where a model goes, a model where an adapter goes. */
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_tokenize((SparrowModel *)session, text, false, false, ids, 64, &n));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_adapter_apply(model, (SparrowAdapter *)model, 1.0f));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_session_destroy((SparrowSession *)model));
    /* Forged handles are not dereferenced. */
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_session_reset((SparrowSession *)(uintptr_t)0xdeadbeef));

    /* Destroyed handles, and double destroys. */
    EXPECT(SPARROW_OK, sparrow_adapter_destroy(lora));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_adapter_destroy(lora));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_adapter_apply(model, lora, 1.0f));
    EXPECT(SPARROW_OK, sparrow_session_destroy(session));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_session_destroy(session));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_session_generate(session, prompt, NULL, NULL, NULL, NULL));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_session_cancel(session));

    /* A session outlives its model's handle; the model goes when both are destroyed. */
    SparrowSession *orphan = NULL;
    EXPECT(SPARROW_OK, sparrow_session_create(other, 0, &orphan));
    EXPECT(SPARROW_OK, sparrow_model_destroy(other));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_model_destroy(other));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_adapter_apply(other, other_lora, 1.0f));
    EXPECT(SPARROW_OK, sparrow_session_generate(orphan, prompt, NULL, NULL, NULL, NULL));
    EXPECT(SPARROW_OK, sparrow_session_destroy(orphan));
    EXPECT(SPARROW_OK, sparrow_adapter_destroy(other_lora));

    EXPECT(SPARROW_OK, sparrow_adapter_destroy(shira));
    EXPECT(SPARROW_OK, sparrow_model_destroy(qwen));
    EXPECT(SPARROW_OK, sparrow_model_destroy(model));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_model_destroy(model));
    EXPECT(SPARROW_ERR_INVALID_HANDLE, sparrow_session_create(model, 0, &session));

    printf("ok: %d checks\n", checks);
    return 0;
}
