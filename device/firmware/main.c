/* fedtiny firmware: the device side of the bridge protocol (docs/protocol.md) over the board's UART.
 *
 * A serial line has no connections: the bridge opens each exchange with a HELLO, which this device
 * answers with its own. TRAIN streams: its JSON header is scanned as it arrives (round, seed, the
 * downlink kind, and the scenario's training and compression settings, checked against the ones this
 * image was built for), and the full model's dense tensors go straight into place: trained tensors
 * into RAM, frozen ones checked against the flash copy (CRC-32). No buffer holds the frame. The device
 * trains its compiled-in samples with the C step (the scenario's epochs and batch size, the portable
 * sample order, the round's seed from TRAIN), sends BUSY after every step (the bridge's keep-alive),
 * and answers with UPDATE: its trained tensors (dense), or their change sparsified (top-k with error
 * feedback), quantized to int8 and encoded with the C codec one tensor at a time, exactly as
 * fedtiny/compress/sparsify.py does. The error-feedback residual advances only on the bridge's ACK of
 * that UPDATE: it is recomputed then from what has not changed since (the tensors, the round's start
 * values, the old residual). Every figure of RAM here is counted by fedtiny/budget/device_memory.py. */
#include <math.h>
#include <string.h>

#include "board.h"
#include "fedtiny_codec.h"
#include "fedtiny_step.h"
#include "firmware_model.h"

#ifndef BOARD_NAME
#define BOARD_NAME "board"
#endif
#define HELLO 1
#define TRAIN 2
#define UPDATE 3
#define ERROR 5
#define BUSY 6
#define ACK 7
#define SHUFFLE_SLOT 0x53485546u
/* silence inside a frame after which it is abandoned (the line resyncs): 2 s of board time. In QEMU a
 * host thread hands the UART one byte at a time while the CPU polls, so board time runs on while that
 * thread waits for a host core: 200 ms cut a 0.5 MB TRAIN (MCUNet) on a loaded 2-core host. */
#ifndef BYTE_TIMEOUT_US /* a build may choose (tests/test_firmware.py waits for it: 2 s of board time polling
                          * the UART is about a minute of QEMU) */
#define BYTE_TIMEOUT_US 2000000u
#endif

static uint8_t frame[FW_FRAME_BYTES]; /* payload of a small frame (HELLO, ACK, ERROR) */
static const int8_t *batch_x[FW_BATCH]; /* the step's samples, read where they lie in flash */
static int32_t batch_y[FW_BATCH];
static uint16_t order[FW_SAMPLES];
static char text[FW_TEXT_BYTES];
static ft_step_report report;
static int64_t pending_round = -1; /* the round whose UPDATE awaits the bridge's ACK */

/* ------------------------------------------------------------------ bytes and frames */

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) { /* zlib's CRC-32, bitwise */
    crc = ~crc;
    while (n--) {
        int k;
        crc ^= *p++;
        for (k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint32_t tx_crc;

static void tx(const void *p, uint32_t n) { /* write and add to the frame's CRC */
    tx_crc = crc32_update(tx_crc, (const uint8_t *)p, n);
    uart_write(p, n);
}

static void tx_begin(uint8_t type, uint32_t len) {
    uint8_t h[10] = {'F', 'T', 'B', 1, type, 0};
    put_u32(h + 6, len);
    tx_crc = 0;
    tx(h, 10);
}

static void tx_end(void) {
    uint8_t c[4];
    put_u32(c, tx_crc);
    uart_write(c, 4);
}

static void send_frame(uint8_t type, const void *payload, uint32_t n) {
    tx_begin(type, n);
    tx(payload, n);
    tx_end();
}

static uint32_t rx_crc;

static int rx(void) { /* the next byte of a frame, or -1 after BYTE_TIMEOUT_US of silence */
    const int c = uart_read_byte_timeout(BYTE_TIMEOUT_US);
    if (c >= 0) {
        const uint8_t b = (uint8_t)c;
        rx_crc = crc32_update(rx_crc, &b, 1);
    }
    return c;
}

/* ------------------------------------------------------------------ a little JSON */

static char *put_str(char *p, const char *s) {
    while (*s) *p++ = *s++;
    return p;
}

static char *put_uint(char *p, uint64_t v) {
    char tmp[24];
    int k = 0;
    do tmp[k++] = (char)('0' + v % 10u);
    while (v /= 10u);
    while (k) *p++ = tmp[--k];
    return p;
}

static char *put_fixed(char *p, float v, uint32_t scale) { /* v with log10(scale) decimals */
    uint64_t q;
    uint32_t frac, s;
    if (!(v == v)) return put_str(p, "0");
    if (v < 0) {
        *p++ = '-';
        v = -v;
    }
    q = (uint64_t)(v * (float)scale + 0.5f);
    p = put_uint(p, q / scale);
    *p++ = '.';
    frac = (uint32_t)(q % scale);
    for (s = scale / 10u; s; s /= 10u) *p++ = (char)('0' + (frac / s) % 10u);
    return p;
}

static void send_error(const char *code, const char *message) {
    char *p = put_str(text, "{\"code\": \"");
    p = put_str(p, code);
    p = put_str(p, "\", \"message\": \"");
    p = put_str(p, message);
    p = put_str(p, "\"}");
    send_frame(ERROR, text, (uint32_t)(p - text));
}

/* The unsigned integer after "key" in a small JSON payload; -1 when absent. */
static int64_t json_uint(const char *json, uint32_t n, const char *key) {
    const size_t k = strlen(key);
    uint32_t i;
    for (i = 0; i + k + 3 < n; i++)
        if (json[i] == '"' && !memcmp(json + i + 1, key, k) && json[i + 1 + k] == '"') {
            int64_t v = -1;
            uint32_t j = i + k + 2;
            while (j < n && (json[j] == ':' || json[j] == ' ')) j++;
            while (j < n && json[j] >= '0' && json[j] <= '9') v = (v < 0 ? 0 : v * 10) + (json[j++] - '0');
            return v;
        }
    return -1;
}

/* A streaming JSON scanner: fed one character at a time, it calls back with the dotted path of each
 * scalar in nested objects ("train.lr") and its JSON text ("0.02", "\"sparse\"", "true"). Paths deeper
 * than JS_DEPTH and values longer than JS_TOKEN are cut (they match nothing this device checks). */
#define JS_DEPTH 4
#define JS_KEY 24
#define JS_TOKEN 40
typedef struct js js;
typedef void (*js_value_fn)(js *s, const char *path, const char *value);
struct js {
    int depth, in_string, escape, expect_key, in_value, arrays;
    char key[JS_DEPTH][JS_KEY];
    char tok[JS_TOKEN];
    int tok_n, tok_is_key;
    js_value_fn on_value;
    js *inner; /* the scenario: a JSON document inside a string value */
    int feeding_inner;
};

static void js_reset(js *s, js_value_fn fn, js *inner) {
    memset(s, 0, sizeof *s);
    s->on_value = fn;
    s->inner = inner;
}

static void js_emit(js *s) {
    char path[JS_DEPTH * JS_KEY];
    char *p = path;
    int d;
    if (!s->in_value || s->arrays || s->depth < 1 || s->depth > JS_DEPTH) {
        s->in_value = 0;
        s->tok_n = 0;
        return;
    }
    for (d = 0; d < s->depth; d++) {
        if (d) *p++ = '.';
        p = put_str(p, s->key[d]);
    }
    *p = 0;
    s->tok[s->tok_n < JS_TOKEN ? s->tok_n : JS_TOKEN - 1] = 0;
    s->on_value(s, path, s->tok);
    s->in_value = 0;
    s->tok_n = 0;
}

static void js_tok(js *s, char c) {
    if (s->tok_n < JS_TOKEN - 1) s->tok[s->tok_n] = c;
    s->tok_n++;
}

static void js_feed(js *s, char c) {
    if (s->in_string) {
        if (s->feeding_inner) { /* a string holding JSON: unescape it into the inner scanner */
            if (s->escape) {
                s->escape = 0;
                js_feed(s->inner, c == 'n' ? '\n' : c == 't' ? '\t' : c); /* \" \\ \/ pass through */
                return;
            }
            if (c == '\\') { s->escape = 1; return; }
            if (c == '"') { s->in_string = 0; s->feeding_inner = 0; s->in_value = 0; s->tok_n = 0; return; }
            js_feed(s->inner, c);
            return;
        }
        if (!s->tok_is_key) js_tok(s, c);
        else if (s->tok_n < JS_KEY - 1) s->key[s->depth - 1][s->tok_n++] = c, s->key[s->depth - 1][s->tok_n] = 0;
        if (s->escape) { s->escape = 0; return; }
        if (c == '\\') { s->escape = 1; return; }
        if (c == '"') {
            s->in_string = 0;
            if (s->tok_is_key) { /* drop the closing quote from the key */
                if (s->tok_n) s->key[s->depth - 1][--s->tok_n] = 0;
                s->tok_n = 0;
                s->tok_is_key = 0;
            } else {
                js_emit(s);
            }
        }
        return;
    }
    switch (c) {
    case ' ': case '\n': case '\r': case '\t':
        if (s->in_value && s->tok_n) js_emit(s);
        return;
    case '{':
        if (s->arrays) { s->arrays++; return; }
        s->depth++;
        s->in_value = 0;
        s->expect_key = 1;
        return;
    case '[':
        s->arrays++;
        s->in_value = 0;
        return;
    case '}': case ']':
        if (s->in_value && s->tok_n) js_emit(s);
        if (s->arrays) { s->arrays--; return; }
        if (s->depth > 0) s->depth--;
        s->in_value = 0;
        return;
    case ':':
        s->in_value = !s->arrays;
        s->tok_n = 0;
        return;
    case ',':
        if (s->in_value && s->tok_n) js_emit(s);
        s->in_value = 0;
        s->expect_key = !s->arrays;
        return;
    case '"':
        s->in_string = 1;
        if (s->expect_key && !s->arrays && s->depth >= 1 && s->depth <= JS_DEPTH) {
            s->tok_is_key = 1;
            s->expect_key = 0;
            s->tok_n = 0;
            s->key[s->depth - 1][0] = 0;
        } else if (s->in_value && s->inner && s->depth == 1 && !strcmp(s->key[0], "scenario")) {
            s->feeding_inner = 1;
            js_reset(s->inner, s->inner->on_value, 0);
        } else {
            s->tok_is_key = 0;
            s->tok_n = 0;
            js_tok(s, c);
        }
        return;
    default:
        if (s->in_value) js_tok(s, c);
    }
}

/* ------------------------------------------------------------------ TRAIN, streamed */

static struct {
    int64_t round, seed;
    int downlink_full, downlink_seen;
    const char *bad_setting; /* the first setting of TRAIN's scenario that differs from this image's */
    char got[JS_TOKEN];
} train_head;

static int64_t parse_uint(const char *v) {
    int64_t x = 0;
    if (*v < '0' || *v > '9') return -1;
    while (*v >= '0' && *v <= '9') x = x * 10 + (*v++ - '0');
    return *v ? -1 : x;
}

static void on_header(js *s, const char *path, const char *value) {
    (void)s;
    if (!strcmp(path, "round")) train_head.round = parse_uint(value);
    else if (!strcmp(path, "seed")) train_head.seed = parse_uint(value);
    else if (!strcmp(path, "downlink")) {
        train_head.downlink_seen = 1;
        train_head.downlink_full = !strcmp(value, "\"full\"");
    }
}

static void on_scenario(js *s, const char *path, const char *value) {
    int i;
    (void)s;
    for (i = 0; i < FW_SETTINGS; i++)
        if (!strcmp(path, fw_settings[i].path) && strcmp(value, fw_settings[i].json) && !train_head.bad_setting) {
            train_head.bad_setting = fw_settings[i].path;
            strncpy(train_head.got, value, sizeof train_head.got - 1);
        }
}

/* Reads the rest of a TRAIN frame of `len` bytes and applies it. Returns 0, or an error code (the
 * ERROR already sent, the frame read to its end where possible). */
static int read_train(uint32_t len) {
    static js outer, inner;
    uint8_t n4[4];
    uint32_t n_json, i, t = 0, crc = 0, crc_frozen_ok = 1, got;
    int c;
    for (i = 0; i < 4; i++) {
        if ((c = rx()) < 0) goto timeout;
        n4[i] = (uint8_t)c;
    }
    n_json = get_u32(n4);
    if (len < 4 || n_json > len - 4) {
        send_error("train", "bad TRAIN header length");
        return -1;
    }
    memset(&train_head, 0, sizeof train_head);
    train_head.round = train_head.seed = -1;
    js_reset(&inner, on_scenario, 0);
    js_reset(&outer, on_header, &inner);
    for (i = 0; i < n_json; i++) {
        if ((c = rx()) < 0) goto timeout;
        js_feed(&outer, (char)c);
    }
    got = len - 4 - n_json;
    /* the downlink, into place as it arrives; a frozen tensor's bytes only feed its CRC */
    for (i = 0; i < got; i++) {
        if ((c = rx()) < 0) goto timeout;
        if (!train_head.downlink_full || got != FW_DOWNLINK_BYTES) continue; /* read, refused below */
        while (t < FW_DOWNLINK_TENSORS && i >= fw_downlink[t].offset + fw_downlink[t].bytes) t++;
        {
            const fw_tensor *d = &fw_downlink[t];
            const uint8_t b = (uint8_t)c;
            if (i == d->offset) crc = 0;
            if (d->dest) ((uint8_t *)d->dest)[i - d->offset] = b;
            else crc = crc32_update(crc, &b, 1);
            if (i + 1 == d->offset + d->bytes && !d->dest && crc != d->crc) crc_frozen_ok = 0;
        }
    }
    {
        const uint32_t want = rx_crc;
        uint32_t sent = 0;
        for (i = 0; i < 4; i++) {
            if ((c = uart_read_byte_timeout(BYTE_TIMEOUT_US)) < 0) goto timeout;
            sent |= (uint32_t)c << (8 * i);
        }
        if (sent != want) {
            send_error("crc", "CRC mismatch");
            return -1;
        }
    }
    if (train_head.round < 0 || train_head.seed < 0 || train_head.seed > 0xFFFFFFFFll) {
        send_error("train", "TRAIN needs round and seed (the bridge's round seed)");
        return -1;
    }
    if (!train_head.downlink_full || got != FW_DOWNLINK_BYTES) {
        send_error("downlink", "this firmware takes the full dense model of its scenario (compression.downlink = "
                               "\\\"full\\\")");
        return -1;
    }
    if (!crc_frozen_ok) {
        send_error("model", "a frozen tensor differs from the firmware's: flash this scenario's model");
        return -1;
    }
    if (train_head.bad_setting) {
        char *p = put_str(text, "{\"code\": \"settings\", \"message\": \"");
        p = put_str(p, train_head.bad_setting);
        p = put_str(p, " differs from the one this firmware was built for: rebuild it for this scenario "
                       "(fedtiny device firmware)\", \"key\": \"");
        p = put_str(p, train_head.bad_setting);
        p = put_str(p, "\"}");
        send_frame(ERROR, text, (uint32_t)(p - text));
        return -1;
    }
    return 0;
timeout:
    send_error("timeout", "the frame stopped arriving: abandoned");
    return -1;
}

/* ------------------------------------------------------------------ the sparse uplink */

#if FW_UPLINK_SPARSE
static const fw_slice *cur; /* the tensor being ranked */
static uint16_t heap[FW_K_MAX]; /* its top k (positions in the slice) */
static uint32_t sent_idx[FW_K_MAX];
static float sent_val[FW_K_MAX];
static uint8_t enc[FW_ENC_BYTES];

static int32_t element(const fw_slice *s, uint32_t p) {
    return s->is_int32 ? ((const int32_t *)s->data)[p] : (int32_t)((const int8_t *)s->data)[p];
}

static int32_t before(const fw_slice *s, uint32_t j) {
    return s->is_int32 ? ((const int32_t *)s->before)[j] : (int32_t)((const int8_t *)s->before)[j];
}

static double residual(const fw_slice *s, uint32_t j) {
#if !FW_ERROR_FEEDBACK
    (void)s, (void)j;
    return 0.0;
#elif FW_RESIDUAL_COMPACT
    return s->is_int32 ? (double)((const float *)s->residual)[j] : (double)((const int16_t *)s->residual)[j] / 256.0;
#else
    return ((const double *)s->residual)[j];
#endif
}

static void set_residual(const fw_slice *s, uint32_t j, double r) {
#if FW_ERROR_FEEDBACK && FW_RESIDUAL_COMPACT
    if (s->is_int32) {
        ((float *)s->residual)[j] = (float)r;
    } else { /* fedtiny.compress.sparsify.compact_residual: 1/256 steps, half to even, saturated */
        double q = nearbyint(r * 256.0);
        q = q > 32767.0 ? 32767.0 : (q < -32768.0 ? -32768.0 : q);
        ((int16_t *)s->residual)[j] = (int16_t)q;
    }
#elif FW_ERROR_FEEDBACK
    ((double *)s->residual)[j] = r;
#else
    (void)s, (void)j, (void)r;
#endif
}

/* what position j would send: its change this round plus what earlier rounds did not send */
static double change(const fw_slice *s, uint32_t j) {
    return ((double)element(s, s->pos[j]) - (double)before(s, j)) + residual(s, j);
}

static void snapshot(void) { /* the trainable values as the round's model has them */
    uint32_t t, j;
    for (t = 0; t < FW_UPLINK_TENSORS; t++) {
        const fw_slice *s = &fw_slices[t];
        for (j = 0; j < s->n; j++) {
            if (s->is_int32)
                ((int32_t *)s->before)[j] = element(s, s->pos[j]);
            else
                ((int8_t *)s->before)[j] = (int8_t)element(s, s->pos[j]);
        }
    }
}

static int better(uint16_t a, uint16_t b) { /* top-k order: larger magnitude, then lower position */
    const double x = fabs(change(cur, a)), y = fabs(change(cur, b));
    return x > y || (x == y && a < b);
}

static void sift(uint16_t *h, uint32_t n, uint32_t i, int by_magnitude) {
    for (;;) { /* by magnitude: the root is the worst kept; by position: a max-heap of positions */
        uint32_t l = 2 * i + 1, m = i;
        if (l < n && (by_magnitude ? better(h[m], h[l]) : h[l] > h[m])) m = l;
        if (l + 1 < n && (by_magnitude ? better(h[m], h[l + 1]) : h[l + 1] > h[m])) m = l + 1;
        if (m == i) return;
        {
            const uint16_t x = h[i];
            h[i] = h[m];
            h[m] = x;
        }
        i = m;
    }
}

/* The k positions of slice s the top-k sends, in position order, into heap[0..k). */
static uint32_t select_top(const fw_slice *s) {
    uint32_t k = (uint32_t)ceil(FW_DENSITY * (double)s->n), j, n;
    k = k < s->n ? k : s->n;
    cur = s;
    if (k == s->n) {
        for (j = 0; j < k; j++) heap[j] = (uint16_t)j;
        return k;
    }
    for (j = 0; j < k; j++) heap[j] = (uint16_t)j;
    for (j = k / 2; j-- > 0;) sift(heap, k, j, 1);
    for (j = k; j < s->n; j++)
        if (better((uint16_t)j, heap[0])) {
            heap[0] = (uint16_t)j;
            sift(heap, k, 0, 1);
        }
    for (j = k / 2; j-- > 0;) sift(heap, k, j, 0); /* heap sort by position */
    for (n = k; n > 1; n--) {
        const uint16_t x = heap[0];
        heap[0] = heap[n - 1];
        heap[n - 1] = x;
        sift(heap, n - 1, 0, 0);
    }
    return k;
}

/* One uplink tensor as fedtiny.compress.sparsify.compress_update sends it (int8 values, per-tensor top-k,
 * one scale: 1 when the values are integers within 127). commit = 0: encode it into enc and return its
 * bytes without the codec's 5-byte message header (0: nothing to send, < 0 error); commit = 1: advance
 * the residual as sending it did (the ACK). */
static int32_t uplink_tensor(const fw_slice *s, int commit) {
    const uint32_t k = select_top(s);
    uint32_t j, next = 0;
    double peak = 0.0, scale = 1.0;
    int integral = 1;
    ft_tensor t;
    size_t len = 0;
    for (j = 0; j < k; j++) {
        const double v = change(s, heap[j]);
        peak = fabs(v) > peak ? fabs(v) : peak;
        integral &= v == nearbyint(v);
    }
    if (!(integral && peak <= 127.0)) scale = peak > 0.0 ? (double)(float)(peak / 127.0) : 1.0;
    for (j = 0; j < s->n; j++) { /* in position order: the chosen ones are heap[0..k) */
        const double v = change(s, j);
        double sent = 0.0;
        if (next < k && heap[next] == j) {
            double q = nearbyint(v / scale);
            q = q > 127.0 ? 127.0 : (q < -127.0 ? -127.0 : q);
            sent = q * scale;
            sent_idx[next] = s->pos[j];
            sent_val[next] = (float)sent;
            next++;
            if (commit) set_residual(s, j, v - sent);
        } else if (commit) {
            set_residual(s, j, v);
        }
    }
    if (commit || k == 0) return 0;
    memset(&t, 0, sizeof t);
    t.tensor_id = s->id;
    t.ndim = s->ndim;
    memcpy(t.dims, s->dims, sizeof t.dims);
    t.nnz = k;
    t.value_type = FT_INT8;
    t.scale = (float)scale;
    t.indices = sent_idx;
    t.values = sent_val;
    if (ft_encode(&t, 1, enc, sizeof enc, &len) != FT_OK || len < 5) return -1;
    return (int32_t)len - 5;
}

/* The update's length (send = 0) or the update sent as the rest of the open frame (send = 1). */
static int32_t uplink(int send) {
    uint32_t t, n_tensors = 0;
    int32_t total = 0;
    uint8_t head[5] = {'F', 'T', 'U', 1, 0};
    for (t = 0; t < FW_UPLINK_TENSORS; t++) n_tensors += fw_slices[t].n > 0;
    if (n_tensors > 127) return -1;
    head[4] = (uint8_t)n_tensors;
    if (send) tx(head, 5);
    total = 5;
    for (t = 0; t < FW_UPLINK_TENSORS; t++) {
        const int32_t n = fw_slices[t].n ? uplink_tensor(&fw_slices[t], 0) : 0;
        if (n < 0) return -1;
        if (send) tx(enc + 5, (uint32_t)n);
        total += n;
        board_watchdog_kick();
    }
    return total;
}

static void commit_residual(void) {
    uint32_t t;
    for (t = 0; t < FW_UPLINK_TENSORS; t++)
        if (fw_slices[t].n) uplink_tensor(&fw_slices[t], 1);
}
#endif

/* ------------------------------------------------------------------ the round */

static void shuffle(uint32_t seed, uint32_t epoch) { /* fedtiny.int8.exact.permutation */
    const uint32_t base = ft_stream_base(seed, epoch, SHUFFLE_SLOT);
    uint32_t i;
    for (i = 0; i < FW_SAMPLES; i++) order[i] = (uint16_t)i;
    for (i = FW_SAMPLES - 1; i > 0; i--) {
        const uint32_t j = ft_hash32(base + i) % (i + 1u);
        const uint16_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

#ifdef FT_PROFILE
/* A measurement build (make firmware PROFILE=1): the C step reports each op's parts (forward, gradient
 * quantization and bias, input gradient, weight gradient, weight update) and this tallies their ticks over
 * the round; the round's end prints them on the host's console (semihosting) as one line,
 *   FTPROFILE {"steps": S, "tick_hz": H, "ops": [[forward, quantize, input, weight, update] per op]} */
static uint32_t profile_ticks[FW_N_OPS][5];

uint32_t ft_profile_clock(void) { return (uint32_t)board_ticks(); }

void ft_profile_add(int32_t op, int32_t part, uint32_t elapsed) {
    if (op >= 0 && op < FW_N_OPS && part >= 0 && part < 5) profile_ticks[op][part] += elapsed;
}

static void profile_report(uint32_t steps) {
    char line[96];
    int32_t i, k;
    char *p = put_str(line, "FTPROFILE {\"steps\": ");
    p = put_uint(p, steps);
    p = put_str(p, ", \"tick_hz\": ");
    p = put_uint(p, BOARD_TICK_HZ);
    p = put_str(p, ", \"ops\": [");
    *p = 0;
    board_debug_write(line);
    for (i = 0; i < FW_N_OPS; i++) {
        p = put_str(line, i ? ", [" : "[");
        for (k = 0; k < 5; k++) {
            p = put_uint(p, profile_ticks[i][k]);
            p = put_str(p, k < 4 ? ", " : "]");
            profile_ticks[i][k] = 0;
        }
        *p = 0;
        board_debug_write(line);
    }
    board_debug_write("]}\n");
}
#endif

#ifdef FT_CHECK_OPS
/* An op-check build (make firmware CHECK=1): every tensor the step produces, its FNV-1a hash on the host's
 * console as "FTCHECK op what bytes hash", the lines the host's check build prints (device/c/check_host.c). */
void ft_check_tensor(int32_t op, int32_t what, const void *data, size_t bytes) {
    const uint8_t *d = (const uint8_t *)data;
    uint32_t h = 2166136261u;
    char line[64], *p;
    size_t i;
    for (i = 0; i < bytes; i++) h = (h ^ d[i]) * 16777619u;
    p = put_str(line, "FTCHECK ");
    p = put_uint(p, (uint32_t)op);
    p = put_str(p, " ");
    p = put_uint(p, (uint32_t)what);
    p = put_str(p, " ");
    p = put_uint(p, bytes);
    p = put_str(p, " ");
    p = put_uint(p, h);
    p = put_str(p, "\n");
    *p = 0;
    board_debug_write(line);
}
#endif

static void send_busy(uint32_t round_, uint32_t step, uint32_t steps) {
    char *p = put_str(text, "{\"round\": ");
    p = put_uint(p, round_);
    p = put_str(p, ", \"step\": ");
    p = put_uint(p, step);
    p = put_str(p, ", \"steps\": ");
    p = put_uint(p, steps);
    p = put_str(p, "}");
    send_frame(BUSY, text, (uint32_t)(p - text));
}

static void train_round(void) {
    const uint32_t seed = (uint32_t)train_head.seed, round_ = (uint32_t)train_head.round;
    const uint32_t steps_total = FW_EPOCHS * ((FW_SAMPLES + FW_BATCH - 1) / FW_BATCH);
    uint32_t i, epoch, steps = 0, seen = 0, head;
    uint64_t ticks = 0;
    float loss_sum = 0.0f;
    size_t arena_high = 0;
    char *p;
#if FW_UPLINK_SPARSE
    snapshot();
#endif
    send_busy(round_, 0, steps_total);
    for (epoch = 0; epoch < FW_EPOCHS; epoch++) {
        shuffle(seed, epoch);
        for (i = 0; i < FW_SAMPLES; i += FW_BATCH) {
            const uint32_t n = FW_SAMPLES - i < FW_BATCH ? FW_SAMPLES - i : FW_BATCH;
            uint32_t k;
            uint64_t t0;
            int rc;
            for (k = 0; k < n; k++) {
                batch_x[k] = fw_samples_x + (size_t)order[i + k] * FW_SAMPLE_BYTES;
                batch_y[k] = fw_samples_y[order[i + k]];
            }
            fw_model.plan = n > 1 ? fw_plan_many : fw_plan_one;
            fw_model.plan_len = n > 1 ? fw_plan_many_len : fw_plan_one_len;
            fw_model.plan_batch = n > 1 ? 2 : 1;
            t0 = board_ticks();
            rc = ft_train_step_samples(&fw_model, batch_x, batch_y, (int32_t)n, seed, steps, fw_arena,
                                       FW_ARENA_BYTES, &report);
            ticks += board_ticks() - t0;
            board_watchdog_kick();
            if (rc) { send_error("step", "ft_train_step failed (arena or model)"); return; }
            arena_high = report.arena_high_water > arena_high ? report.arena_high_water : arena_high;
            for (k = 0; k < n; k++) /* the per-sample loss ln S - ln e_y, as the simulator reports it */
                loss_sum += logf((float)report.sum_exp[k]) - logf(report.exp_y[k] > 0 ? (float)report.exp_y[k] : 0.5f);
            seen += n;
            steps++;
            send_busy(round_, steps, steps_total);
        }
    }
#ifdef FT_PROFILE
    profile_report(steps);
#endif
    p = put_str(text + 4, "{\"info\": {\"device\": \"" FW_PROFILE "\", \"firmware\": \"fedtiny " FW_MODEL_HASH " "
                          BOARD_NAME "\"}, \"metrics\": {\"arena_high_water\": ");
    p = put_uint(p, arena_high);
    p = put_str(p, ", \"device_ram_bytes\": ");
    p = put_uint(p, FW_DEVICE_RAM_BYTES);
    p = put_str(p, ", \"instructions_per_step\": ");
    p = put_uint(p, steps ? ticks * (1000000000u / BOARD_TICK_HZ) / steps : 0); /* -icount shift=0: 1 ns each */
    p = put_str(p, ", \"profile_sram_bytes\": ");
    p = put_uint(p, FW_PROFILE_SRAM_BYTES);
    p = put_str(p, ", \"stack_bytes\": ");
    p = put_uint(p, board_stack_used());
    p = put_str(p, ", \"steps\": ");
    p = put_uint(p, steps);
    p = put_str(p, ", \"train_loss\": ");
    p = put_fixed(p, seen ? loss_sum / (float)seen : 0.0f, 1000000u);
    p = put_str(p, "}, \"num_examples\": ");
    p = put_uint(p, FW_SAMPLES);
    p = put_str(p, "}");
    head = (uint32_t)(p - text - 4);
    put_u32((uint8_t *)text, head);
#if FW_UPLINK_SPARSE
    {
        const int32_t n_up = uplink(0);
        if (n_up <= 0) { send_error("encode", "the sparse update does not fit its buffer"); return; }
        tx_begin(UPDATE, 4 + head + (uint32_t)n_up);
        tx(text, 4 + head);
        uplink(1);
        tx_end();
    }
#else
    {
        uint32_t n_up = 0;
        for (i = 0; i < FW_UPLINK_TENSORS; i++) n_up += fw_uplink[i].bytes;
        tx_begin(UPDATE, 4 + head + n_up);
        tx(text, 4 + head);
        for (i = 0; i < FW_UPLINK_TENSORS; i++) tx(fw_uplink[i].src, fw_uplink[i].bytes);
        tx_end();
    }
#endif
    pending_round = round_;
}

/* ------------------------------------------------------------------ the loop */

/* The next frame's header: bytes before the magic are skipped (waiting here kicks the watchdog);
 * returns its type and length, or -1 for a header to drop (answered with ERROR). */
static int read_header(uint32_t *len) {
    uint8_t h[10] = {'F', 'T', 'B'};
    int sync = 0, i;
    while (sync < 3) {
        const int c = uart_read_byte();
        sync = c == "FTB"[sync] ? sync + 1 : (c == 'F' ? 1 : 0);
    }
    rx_crc = crc32_update(0, h, 3);
    for (i = 3; i < 10; i++) {
        const int c = rx();
        if (c < 0) return -1; /* a header cut short: resync quietly */
        h[i] = (uint8_t)c;
    }
    *len = get_u32(h + 6);
    if (h[3] != 1 || h[4] < HELLO || h[4] > ACK || h[5] != 0 || (h[4] != TRAIN && *len > FW_FRAME_BYTES)) {
        send_error("frame", "bad header or payload too large");
        return -1;
    }
    return h[4];
}

static int read_small(uint32_t len) { /* a small frame's payload into frame[]; 0 when intact */
    uint32_t i, sent = 0;
    int c;
    for (i = 0; i < len; i++) {
        if ((c = rx()) < 0) return -1;
        frame[i] = (uint8_t)c;
    }
    {
        const uint32_t want = rx_crc;
        for (i = 0; i < 4; i++) {
            if ((c = uart_read_byte_timeout(BYTE_TIMEOUT_US)) < 0) return -1;
            sent |= (uint32_t)c << (8 * i);
        }
        if (sent != want) {
            send_error("crc", "CRC mismatch");
            return -1;
        }
    }
    return 0;
}

int main(void) {
    board_init();
    for (;;) {
        uint32_t len;
        const int type = read_header(&len);
        if (type < 0) continue;
        if (type == TRAIN) {
            pending_round = -1; /* a TRAIN without the last UPDATE's ACK: that update never counted */
            if (read_train(len) == 0) train_round();
            continue;
        }
        if (read_small(len)) continue;
        if (type == HELLO) {
            char *p = put_str(text, "{\"model_hash\": \"" FW_MODEL_HASH "\", \"partition_id\": ");
            p = put_uint(p, FW_PARTITION);
            p = put_str(p, ", \"profile\": \"" FW_PROFILE "\", \"protocol\": 1}");
            send_frame(HELLO, text, (uint32_t)(p - text));
        } else if (type == ACK) {
            const int64_t r = json_uint((const char *)frame, len, "round");
#if FW_UPLINK_SPARSE
            if (r >= 0 && r == pending_round) commit_residual();
#endif
            if (r == pending_round) pending_round = -1;
        } else if (type == ERROR) {
            continue; /* the bridge gave up on this exchange */
        } else {
            send_error("unexpected", "this device answers HELLO, TRAIN and ACK");
        }
    }
}
