/* fedtiny firmware: the device side of the bridge protocol (docs/protocol.md) over UART0.
 *
 * A serial line has no connections: the bridge opens each exchange with a HELLO, which this device
 * answers with its own. TRAIN carries the full model as dense tensors: trained tensors are copied
 * into RAM, frozen ones are checked against the flash copy (CRC-32). The device trains its
 * compiled-in samples with the C step (the scenario's epochs and batch size, the portable sample
 * order, the round's seed from TRAIN), and answers UPDATE with its trained tensors: dense, or their
 * change sparsified (top-k with error feedback), quantized to int8 and encoded with the C codec,
 * exactly as fedtiny/compress/sparsify.py does. */
#include <math.h>
#include <string.h>

#include "board.h"
#include "fedtiny_codec.h"
#include "fedtiny_step.h"
#include "firmware_model.h"

#define JSON_MAX 8192 /* the TRAIN header: round, seed, the resolved scenario (about 4 KB) and scheme */
#define PAYLOAD_MAX (4 + JSON_MAX + FW_DOWNLINK_BYTES)
#define HELLO 1
#define TRAIN 2
#define UPDATE 3
#define ERROR 5
#define SHUFFLE_SLOT 0x53485546u

static uint8_t payload[PAYLOAD_MAX];
static uint8_t batch_x[FW_BATCH * FW_SAMPLE_BYTES];
static int32_t batch_y[FW_BATCH];
static uint16_t order[FW_SAMPLES];
static char text[512];
static ft_step_report report;

/* ------------------------------------------------------------------ frames */

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

/* One frame whose payload is `head` (n1 bytes) followed by the `parts` (the uplink tensors). */
static void send_frame(uint8_t type, const void *head, uint32_t n1, const fw_upload *parts, int nparts) {
    uint8_t h[10] = {'F', 'T', 'B', 1, type, 0};
    uint32_t len = n1, crc;
    int i;
    for (i = 0; i < nparts; i++) len += parts[i].bytes;
    put_u32(h + 6, len);
    crc = crc32_update(0, h, 10);
    crc = crc32_update(crc, (const uint8_t *)head, n1);
    for (i = 0; i < nparts; i++) crc = crc32_update(crc, (const uint8_t *)parts[i].src, parts[i].bytes);
    uart_write(h, 10);
    uart_write(head, n1);
    for (i = 0; i < nparts; i++) uart_write(parts[i].src, parts[i].bytes);
    put_u32(h, crc);
    uart_write(h, 4);
}

/* The next intact frame: bytes before the magic are skipped; a frame that is too large or corrupted is
 * answered with ERROR and skipped. Returns its type; the payload is in `payload`, its length in *n. */
static int read_frame(uint32_t *n) {
    for (;;) {
        uint8_t h[10];
        uint32_t len, crc, i;
        int sync = 0;
        while (sync < 3) { /* "FTB" */
            const int c = uart_read_byte();
            sync = c == "FTB"[sync] ? sync + 1 : (c == 'F' ? 1 : 0);
        }
        memcpy(h, "FTB", 3);
        for (i = 3; i < 10; i++) h[i] = (uint8_t)uart_read_byte();
        len = get_u32(h + 6);
        if (h[3] != 1 || h[4] < 1 || h[4] > 5 || h[5] != 0 || len > PAYLOAD_MAX) {
            static const char msg[] = "{\"code\": \"frame\", \"message\": \"bad header or payload too large\"}";
            send_frame(ERROR, msg, sizeof msg - 1, 0, 0);
            continue;
        }
        for (i = 0; i < len; i++) payload[i] = (uint8_t)uart_read_byte();
        for (i = 0, crc = 0; i < 4; i++) crc |= (uint32_t)uart_read_byte() << (8 * i);
        if (crc32_update(crc32_update(0, h, 10), payload, len) != crc) {
            static const char msg[] = "{\"code\": \"crc\", \"message\": \"CRC mismatch\"}";
            send_frame(ERROR, msg, sizeof msg - 1, 0, 0);
            continue;
        }
        *n = len;
        return h[4];
    }
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

/* The unsigned integer after "key": in json (n bytes); -1 when absent. */
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

static int json_has(const char *json, uint32_t n, const char *text_) {
    const size_t k = strlen(text_);
    uint32_t i;
    for (i = 0; i + k <= n; i++)
        if (!memcmp(json + i, text_, k)) return 1;
    return 0;
}

static void send_error(const char *code, const char *message) {
    char *p = put_str(text, "{\"code\": \"");
    p = put_str(p, code);
    p = put_str(p, "\", \"message\": \"");
    p = put_str(p, message);
    p = put_str(p, "\"}");
    send_frame(ERROR, text, (uint32_t)(p - text), 0, 0);
}

/* ------------------------------------------------------------------ the sparse uplink */

#if FW_UPLINK_SPARSE
static const fw_slice *cur; /* the tensor being encoded (for the sort's key) */
static uint16_t rank_[FW_SLICE_MAX], scratch[FW_SLICE_MAX];
static uint32_t sent_idx[FW_SENT_TOTAL];
static float sent_val[FW_SENT_TOTAL];
static ft_tensor tensors[FW_UPLINK_TENSORS];
static uint8_t uplink[16 + FW_UPLINK_TENSORS * 64 + FW_SENT_TOTAL * 6];

static int32_t element(const fw_slice *s, uint32_t p) {
    return s->is_int32 ? ((const int32_t *)s->data)[p] : (int32_t)((const int8_t *)s->data)[p];
}

static int32_t before(const fw_slice *s, uint32_t j) {
    return s->is_int32 ? ((const int32_t *)s->before)[j] : (int32_t)((const int8_t *)s->before)[j];
}

/* what position j would send: its change this round plus what earlier rounds did not send */
static double change(const fw_slice *s, uint32_t j) {
    return ((double)element(s, s->pos[j]) - (double)before(s, j)) + (FW_ERROR_FEEDBACK ? s->residual[j] : 0.0);
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

static int ahead(uint16_t a, uint16_t b, int by_magnitude) { /* top-k: larger magnitude, then lower position */
    double x, y;
    if (!by_magnitude) return a < b;
    x = fabs(change(cur, a));
    y = fabs(change(cur, b));
    return x > y || (x == y && a < b);
}

static void sort_indices(uint16_t *v, uint32_t n, int by_magnitude) { /* bottom-up merge sort */
    uint32_t width, i;
    for (width = 1; width < n; width *= 2) {
        for (i = 0; i < n; i += 2 * width) {
            uint32_t a = i, mid = i + width < n ? i + width : n, b = mid, end = i + 2 * width < n ? i + 2 * width : n, k = i;
            while (a < mid || b < end)
                if (b >= end || (a < mid && !ahead(v[b], v[a], by_magnitude)))
                    scratch[k++] = v[a++];
                else
                    scratch[k++] = v[b++];
        }
        memcpy(v, scratch, n * sizeof *v);
    }
}

/* fedtiny.compress.sparsify.compress_update for int8 values and per-tensor top-k: the change at each
 * uplink tensor's trainable positions plus the residual, its top ceil(density n), int8 with one scale
 * (1 when the values are integers within 127), the residual kept; returns the encoded length (< 0 error). */
static int32_t encode_sparse(void) {
    uint32_t t, j, used = 0, n_tensors = 0;
    size_t len = 0;
    for (t = 0; t < FW_UPLINK_TENSORS; t++) {
        const fw_slice *s = cur = &fw_slices[t];
        uint32_t k = (uint32_t)ceil(FW_DENSITY * (double)s->n), next = 0;
        double peak = 0.0, scale = 1.0;
        int integral = 1;
        k = k < s->n ? k : s->n;
        for (j = 0; j < s->n; j++) rank_[j] = (uint16_t)j;
        if (k < s->n) {
            sort_indices(rank_, s->n, 1);
            sort_indices(rank_, k, 0);
        }
        for (j = 0; j < k; j++) {
            const double v = change(s, rank_[j]);
            peak = fabs(v) > peak ? fabs(v) : peak;
            integral &= v == nearbyint(v);
        }
        if (!(integral && peak <= 127.0)) scale = peak > 0.0 ? (double)(float)(peak / 127.0) : 1.0;
        for (j = 0; j < s->n; j++) { /* in position order: the chosen ones are rank_[0..k) */
            const double v = change(s, j);
            double sent = 0.0;
            if (next < k && rank_[next] == j) {
                double q = nearbyint(v / scale);
                q = q > 127.0 ? 127.0 : (q < -127.0 ? -127.0 : q);
                sent = q * scale;
                sent_idx[used + next] = s->pos[j];
                sent_val[used + next] = (float)sent;
                next++;
            }
            if (FW_ERROR_FEEDBACK) s->residual[j] = next && rank_[next - 1] == j ? v - sent : v;
        }
        if (k == 0) continue;
        memset(&tensors[n_tensors], 0, sizeof tensors[n_tensors]);
        tensors[n_tensors].tensor_id = s->id;
        tensors[n_tensors].ndim = s->ndim;
        memcpy(tensors[n_tensors].dims, s->dims, sizeof tensors[n_tensors].dims);
        tensors[n_tensors].nnz = k;
        tensors[n_tensors].value_type = FT_INT8;
        tensors[n_tensors].scale = (float)scale;
        tensors[n_tensors].indices = sent_idx + used;
        tensors[n_tensors].values = sent_val + used;
        used += k;
        n_tensors++;
    }
    if (ft_encode(tensors, n_tensors, uplink, sizeof uplink, &len) != FT_OK) return -1;
    return (int32_t)len;
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

static void train_round(uint32_t len) {
    const uint32_t n_json = get_u32(payload);
    const char *json = (const char *)payload + 4;
    const uint8_t *down;
    int64_t round_, seed;
    uint32_t i, epoch, steps = 0, seen = 0;
    uint64_t ticks = 0;
    float loss_sum = 0.0f;
    size_t arena_high = 0;
    char *p;
    if (n_json > len - 4 || n_json > JSON_MAX) { send_error("train", "bad TRAIN header"); return; }
    down = payload + 4 + n_json;
    round_ = json_uint(json, n_json, "round");
    seed = json_uint(json, n_json, "seed");
    if (round_ < 0 || seed < 0 || seed > 0xFFFFFFFFll)
        { send_error("train", "TRAIN needs round and seed (the bridge's round seed)"); return; }
    if (!json_has(json, n_json, "\"downlink\": \"full\"") || len - 4 - n_json != FW_DOWNLINK_BYTES)
        { send_error("downlink", "the firmware takes the full dense model of its scenario"); return; }
    for (i = 0; i < FW_DOWNLINK_TENSORS; i++) {
        const fw_tensor *t = &fw_downlink[i];
        if (t->dest)
            memcpy(t->dest, down + t->offset, t->bytes);
        else if (crc32_update(0, down + t->offset, t->bytes) != t->crc)
            { send_error("model", "a frozen tensor differs from the firmware's: flash this scenario's model"); return; }
    }
#if FW_UPLINK_SPARSE
    snapshot();
#endif
    for (epoch = 0; epoch < FW_EPOCHS; epoch++) {
        shuffle((uint32_t)seed, epoch);
        for (i = 0; i < FW_SAMPLES; i += FW_BATCH) {
            const uint32_t n = FW_SAMPLES - i < FW_BATCH ? FW_SAMPLES - i : FW_BATCH;
            uint32_t k;
            uint64_t t0;
            int rc;
            for (k = 0; k < n; k++) {
                memcpy(batch_x + k * FW_SAMPLE_BYTES, fw_samples_x + (size_t)order[i + k] * FW_SAMPLE_BYTES,
                       FW_SAMPLE_BYTES);
                batch_y[k] = fw_samples_y[order[i + k]];
            }
            fw_model.plan = n > 1 ? fw_plan_many : fw_plan_one;
            fw_model.plan_len = n > 1 ? fw_plan_many_len : fw_plan_one_len;
            fw_model.plan_batch = n > 1 ? 2 : 1;
            t0 = board_ticks();
            rc = ft_train_step(&fw_model, (const int8_t *)batch_x, batch_y, (int32_t)n, (uint32_t)seed, steps,
                               fw_arena, FW_ARENA_BYTES, &report);
            ticks += board_ticks() - t0;
            if (rc) { send_error("step", "ft_train_step failed (arena or model)"); return; }
            arena_high = report.arena_high_water > arena_high ? report.arena_high_water : arena_high;
            for (k = 0; k < n; k++) /* the per-sample loss ln S - ln e_y, as the simulator reports it */
                loss_sum += logf((float)report.sum_exp[k]) - logf(report.exp_y[k] > 0 ? (float)report.exp_y[k] : 0.5f);
            seen += n;
            steps++;
        }
    }
    p = put_str(text, "{\"info\": {\"device\": \"" FW_PROFILE "\", \"firmware\": \"fedtiny " FW_MODEL_HASH "\"}, "
                      "\"metrics\": {\"arena_high_water\": ");
    p = put_uint(p, arena_high);
    p = put_str(p, ", \"instructions_per_step\": ");
    p = put_uint(p, steps ? ticks * (1000000000u / BOARD_TICK_HZ) / steps : 0); /* -icount shift=0: 1 ns each */
    p = put_str(p, ", \"stack_bytes\": ");
    p = put_uint(p, board_stack_used());
    p = put_str(p, ", \"steps\": ");
    p = put_uint(p, steps);
    p = put_str(p, ", \"train_loss\": ");
    p = put_fixed(p, seen ? loss_sum / (float)seen : 0.0f, 1000000u);
    p = put_str(p, "}, \"num_examples\": ");
    p = put_uint(p, FW_SAMPLES);
    p = put_str(p, "}");
    {
        uint8_t n4[4];
        put_u32(n4, (uint32_t)(p - text));
        memmove(text + 4, text, (size_t)(p - text));
        memcpy(text, n4, 4);
    }
#if FW_UPLINK_SPARSE
    {
        const int32_t n_up = encode_sparse();
        fw_upload part;
        if (n_up <= 0) { send_error("encode", "the sparse update does not fit its buffer"); return; }
        part.src = uplink;
        part.bytes = (uint32_t)n_up;
        send_frame(UPDATE, text, (uint32_t)(p - text) + 4, &part, 1);
    }
#else
    send_frame(UPDATE, text, (uint32_t)(p - text) + 4, fw_uplink, FW_UPLINK_TENSORS);
#endif
}

int main(void) {
    uart_init();
    for (;;) {
        uint32_t len;
        const int type = read_frame(&len);
        if (type == HELLO) {
            char *p = put_str(text, "{\"model_hash\": \"" FW_MODEL_HASH "\", \"partition_id\": ");
            p = put_uint(p, FW_PARTITION);
            p = put_str(p, ", \"profile\": \"" FW_PROFILE "\", \"protocol\": 1}");
            send_frame(HELLO, text, (uint32_t)(p - text), 0, 0);
        } else if (type == TRAIN) {
            train_round(len);
        } else if (type == ERROR) {
            continue; /* the bridge gave up on this exchange */
        } else {
            send_error("unexpected", "this device answers HELLO and TRAIN");
        }
    }
}
