/* wanemu_json.h: the flat JSON reader of wanemu.c's control channel (included by it: one translation unit).
 *
 * Owns: parsing one JSON object into (dotted key path, value) pairs, bounded (key and string lengths, pair
 * count, nesting depth), escaping a string for a reply, and looking a key up. Must not know: the link model,
 * netlink, what the keys mean.
 */
#ifndef WANEMU_JSON_H
#define WANEMU_JSON_H
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ flat JSON reader */
/* Parses one JSON object into (dotted key path, value) pairs: {"a": {"b": 1}} -> ("a.b", 1). */
enum jtype { J_NULL, J_BOOL, J_NUM, J_STR };
typedef struct { char key[96]; enum jtype type; double num; char str[64]; } jpair;
typedef struct { const char *p, *end; jpair *out; int n, cap; const char *err; } jparser;

static void jws(jparser *j) { while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++; }

static int jstring(jparser *j, char *dst, size_t cap) {
    size_t n = 0;
    if (j->p >= j->end || *j->p != '"') { j->err = "expected a string"; return -1; }
    j->p++;
    while (j->p < j->end && *j->p != '"') {
        char c = *j->p++;
        if (c == '\\') {
            if (j->p >= j->end) break;
            c = *j->p++;
            if (c == 'u') { if (j->end - j->p < 4) break; j->p += 4; c = '?'; }
            else if (c == 'n') c = '\n'; else if (c == 't') c = '\t';
        }
        if (n + 1 < cap) dst[n++] = c;
    }
    if (j->p >= j->end) { j->err = "unterminated string"; return -1; }
    j->p++;
    dst[n] = 0;
    return 0;
}

static int jvalue(jparser *j, const char *path, int depth);

static int jobject(jparser *j, const char *path, int depth) {
    char key[64], sub[96];
    if (depth > 4) { j->err = "nested too deep"; return -1; }
    j->p++; /* '{' */
    jws(j);
    if (j->p < j->end && *j->p == '}') { j->p++; return 0; }
    for (;;) {
        jws(j);
        if (jstring(j, key, sizeof key)) return -1;
        jws(j);
        if (j->p >= j->end || *j->p != ':') { j->err = "expected ':'"; return -1; }
        j->p++;
        snprintf(sub, sizeof sub, "%s%s%s", path, *path ? "." : "", key);
        if (jvalue(j, sub, depth + 1)) return -1;
        jws(j);
        if (j->p < j->end && *j->p == ',') { j->p++; continue; }
        if (j->p < j->end && *j->p == '}') { j->p++; return 0; }
        j->err = "expected ',' or '}'";
        return -1;
    }
}

static int jvalue(jparser *j, const char *path, int depth) {
    jpair v = { .type = J_NULL };
    jws(j);
    if (j->p >= j->end) { j->err = "unexpected end"; return -1; }
    if (*j->p == '{') return jobject(j, path, depth);
    if (*j->p == '"') { v.type = J_STR; if (jstring(j, v.str, sizeof v.str)) return -1; }
    else if (j->end - j->p >= 4 && !memcmp(j->p, "true", 4)) { v.type = J_BOOL; v.num = 1; j->p += 4; }
    else if (j->end - j->p >= 5 && !memcmp(j->p, "false", 5)) { v.type = J_BOOL; j->p += 5; }
    else if (j->end - j->p >= 4 && !memcmp(j->p, "null", 4)) { j->p += 4; }
    else {
        char num[64], *e;
        size_t n = 0;
        while (j->p + n < j->end && n + 1 < sizeof num && strchr("+-.eE0123456789", j->p[n])) { num[n] = j->p[n]; n++; }
        num[n] = 0;
        v.num = strtod(num, &e);
        if (!n || *e) { j->err = "bad value (arrays are not supported)"; return -1; }
        v.type = J_NUM;
        j->p += n;
    }
    if (j->n >= j->cap) { j->err = "too many keys"; return -1; }
    snprintf(v.key, sizeof v.key, "%s", path);
    j->out[j->n++] = v;
    return 0;
}

/* -> number of pairs, or -1 with *err set */
static int jparse(const char *s, size_t len, jpair *out, int cap, const char **err) {
    jparser j = { s, s + len, out, 0, cap, NULL };
    jws(&j);
    if (j.p >= j.end || *j.p != '{') { *err = "expected a JSON object"; return -1; }
    if (jobject(&j, "", 0)) { *err = j.err; return -1; }
    jws(&j);
    if (j.p != j.end) { *err = "extra data after the object"; return -1; }
    return j.n;
}

/* s as the inside of a JSON string (quotes, backslashes and control characters escaped) */
static const char *jesc(const char *s, char *dst, size_t cap) {
    size_t n = 0;
    for (; *s && n + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { dst[n++] = '\\'; dst[n++] = (char)c; }
        else if (c < 0x20) n += (size_t)snprintf(dst + n, cap - n, "\\u%04x", c);
        else dst[n++] = (char)c;
    }
    dst[n] = 0;
    return dst;
}

static const jpair *jget(const jpair *v, int n, const char *key) {
    for (int i = 0; i < n; i++) if (!strcmp(v[i].key, key)) return &v[i];
    return NULL;
}

static double jnum(const jpair *v, int n, const char *key, double dflt) {
    const jpair *p = jget(v, n, key);
    return p && (p->type == J_NUM || p->type == J_BOOL) ? p->num : dflt;
}

#endif
