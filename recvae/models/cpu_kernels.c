/* Fused CPU loops of RecVAE's training step, compiled on first use by recvae/models/cpu_kernels.py.
 *
 * Each replaces several passes of eager PyTorch over the same rows with one loop per row: the
 * cost of those passes on CPU is memory traffic, not arithmetic. bf16 values are uint16_t
 * (the upper half of a float32); conversions round to nearest even, as torch's do (the
 * values converted are finite: rows with an infinite or NaN logit are handled apart).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 to ~2e-6 relative (x below -87 gives exp(-87)): 2^n 2^f, n = round(x log2 e),
 * |f| <= 1/2, 2^f by its Taylor polynomial of degree 5. bf16 keeps 8 bits of the result; glibc's
 * vector expf, exact to an ulp, is what made this loop slower than torch's softmax. */
static inline float exp_nonpositive(float x) {
    float t = fmaxf(x, -87.0f) * 1.44269504f;
    float n = __builtin_rintf(t);
    float g = (t - n) * 0.69314718f;
    float p = 1.0f + g * (1.0f + g * (0.5f + g * (1.0f / 6 + g * (1.0f / 24 + g * (1.0f / 120)))));
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* The multinomial likelihood's softmax and its gradient, in place, row by row.
 *
 * For each row u of the (B, I) bf16 logits l: lse[u] = log sum_i exp(l_ui), dot[u] = sum over the
 * row's nonzeros of x_ui * l_ui, then the row is overwritten with softmax(l_u) - x_u / n_u
 * (n_u = row_sums[u]; a row with n_u = 0 keeps its softmax: it is weighted by n_u). Returns
 * nothing: the NLL is 1/B sum_u (n_u lse_u - dot_u) and its gradient w.r.t. l_u is
 * n_u (softmax_u - x_u / n_u), the row's scale applied by the caller to the smaller factors. */
void softmax_nll_bf16(uint16_t *logits, int64_t n_rows, int64_t n_items, const int64_t *crow,
                      const int64_t *cols, const float *values, const float *row_sums, float *lse, float *dot,
                      int n_threads) {
#pragma omp parallel num_threads(n_threads)
    {
        float *e = malloc((size_t)n_items * sizeof(float)); /* one row's exponentials: stays in L2 */
#pragma omp for schedule(static)
        for (int64_t u = 0; u < n_rows; u++) {
            uint16_t *row = logits + u * n_items;
            float top = -INFINITY;
            uint32_t special = 0; /* an infinite or NaN logit: the row's loss and gradient are NaN */
            for (int64_t i = 0; i < n_items; i++) {
                top = fmaxf(top, bf16_to_float(row[i]));
                special |= (row[i] & 0x7f80u) == 0x7f80u;
            }
            if (special) {
                const uint32_t nan_bits = 0x7fc00000u;
                memcpy(&lse[u], &nan_bits, 4);
                dot[u] = 0.0f;
                for (int64_t i = 0; i < n_items; i++) row[i] = 0x7fc0u;
                continue;
            }
            float sum = 0.0f;
            for (int64_t i = 0; i < n_items; i++) {
                e[i] = exp_nonpositive(bf16_to_float(row[i]) - top);
                sum += e[i];
            }
            float d = 0.0f;
            for (int64_t k = crow[u]; k < crow[u + 1]; k++) d += values[k] * bf16_to_float(row[cols[k]]);
            lse[u] = top + logf(sum);
            dot[u] = d;
            const float inv = 1.0f / sum;
            for (int64_t i = 0; i < n_items; i++) row[i] = float_to_bf16(e[i] * inv);
            const float n = row_sums[u];
            if (n > 0.0f)
                for (int64_t k = crow[u]; k < crow[u + 1]; k++)
                    row[cols[k]] = float_to_bf16(bf16_to_float(row[cols[k]]) - values[k] / n);
        }
        free(e);
    }
}
