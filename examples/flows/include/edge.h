/*
 * edge.h: the edge-agent flow ABI v1 for C (and anything that can call C).
 *
 * A flow is a wasm32-wasi (preview 1) reactor module. It may import the functions
 * below from module "edge" and exports edge_alloc / edge_on_event to receive
 * trigger events. Every function returns EDGE_OK (0) or a negative EDGE_ERR_*;
 * none of them traps on bad input. See docs/flow-abi.md.
 *
 * Build: python -m ziglang cc --target=wasm32-wasi -mexec-model=reactor -O2 -s \
 *          -Wl,-z,stack-size=1048576 -I include flow.c -o flow.wasm
 */
#ifndef EDGE_H
#define EDGE_H

#include <stddef.h>
#include <stdint.h>

#define EDGE_IMPORT(name) __attribute__((import_module("edge"), import_name(name)))
#define EDGE_EXPORT(name) __attribute__((export_name(name)))

enum {
    EDGE_OK = 0,
    EDGE_ERR_BOUNDS = -1,     /* a pointer/length outside the flow's memory */
    EDGE_ERR_TOO_LARGE = -2,  /* topic > 512 B, payload > 256 KiB, ... */
    EDGE_ERR_DENIED = -3,     /* topic not permitted; storage not available */
    EDGE_ERR_NOT_FOUND = -4,  /* no such key */
    EDGE_ERR_QUOTA = -5,      /* storage quota exceeded */
    EDGE_ERR_BUFFER = -6,     /* output buffer too small; *out_len holds the size needed */
    EDGE_ERR_RATE = -7,       /* publish/log rate limit reached; message dropped */
    EDGE_ERR_INVALID = -8,    /* invalid argument (qos, UTF-8, key length) */
    EDGE_ERR_INTERNAL = -9,
};

/* Event kinds passed to edge_on_event. */
enum {
    EDGE_EVENT_STARTUP = 1,   /* name: trigger name; payload: empty */
    EDGE_EVENT_INTERVAL = 2,  /* name: trigger name; payload: empty */
    EDGE_EVENT_COMMAND = 3,   /* name: command name; payload: the command's JSON payload */
    EDGE_EVENT_MQTT = 4,      /* name: the topic; payload: the message bytes */
};

enum { EDGE_LOG_DEBUG = 0, EDGE_LOG_INFO = 1, EDGE_LOG_WARNING = 2, EDGE_LOG_ERROR = 3 };

/* Publish to a topic relative to {prefix}/{deviceId}/; "~/x" means this flow's own
 * area flows/{flowId}/x (always permitted). qos is 0 or 1. */
EDGE_IMPORT("publish") int32_t edge_publish(const char *topic, int32_t topic_len,
                                            const void *payload, int32_t payload_len,
                                            int32_t qos);
EDGE_IMPORT("log") int32_t edge_log(int32_t level, const char *msg, int32_t msg_len);
/* Key/value storage, persisted per flow, kept across upgrades. *out_len is a u32. */
EDGE_IMPORT("kv_get") int32_t edge_kv_get(const char *key, int32_t key_len, void *out,
                                          int32_t out_cap, uint32_t *out_len);
EDGE_IMPORT("kv_set") int32_t edge_kv_set(const char *key, int32_t key_len, const void *value,
                                          int32_t value_len);
EDGE_IMPORT("kv_delete") int32_t edge_kv_delete(const char *key, int32_t key_len);
/* Milliseconds since the Unix epoch. */
EDGE_IMPORT("time_ms") int64_t edge_time_ms(void);
/* The flow's config (the desired entry's "config"), as JSON. */
EDGE_IMPORT("config_get") int32_t edge_config_get(void *out, int32_t out_cap, uint32_t *out_len);
/* While handling EDGE_EVENT_COMMAND: the command's result, returned to whoever sent it
 * (UTF-8, JSON or text, at most 64 KiB; the last call wins). EDGE_ERR_INVALID otherwise. */
EDGE_IMPORT("respond") int32_t edge_respond(const char *body, int32_t body_len);
/* Hold installs of a new version of this flow back for up to `seconds` (0..3600; 0 withdraws). */
EDGE_IMPORT("defer_update") int32_t edge_defer_update(int32_t seconds);

/* Convenience wrappers for NUL-terminated strings. */
static inline size_t edge_strlen_(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static inline int32_t edge_publish_str(const char *topic, const char *payload, int32_t qos) {
    return edge_publish(topic, (int32_t)edge_strlen_(topic), payload,
                        (int32_t)edge_strlen_(payload), qos);
}
static inline int32_t edge_log_str(int32_t level, const char *msg) {
    return edge_log(level, msg, (int32_t)edge_strlen_(msg));
}
static inline int32_t edge_respond_str(const char *body) {
    return edge_respond(body, (int32_t)edge_strlen_(body));
}

#endif /* EDGE_H */
