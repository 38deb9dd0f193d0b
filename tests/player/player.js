// The test player: hls.js with its DEFAULT configuration, muted autoplay, no retry or recovery code.
// It reports what a viewer would notice to the page's own origin (POST /events, JSON arrays of
// events, in order): hls.js events, <video> events and a sample of the <video> element every 200 ms.
// Every event has `kind`, `seq` (0, 1, 2, ...) and `t` (Unix time in ms, from the monotonic clock).
'use strict';
(function () {
  const params = new URLSearchParams(location.search);
  const src = params.get('src');
  const video = document.getElementById('video');
  const now = () => performance.timeOrigin + performance.now();

  let seq = 0;
  let queue = [];
  let sending = false;
  function emit(kind, data) {
    queue.push(Object.assign({ kind: kind, seq: seq++, t: now() }, data || {}));
  }
  // One POST at a time, so the harness receives the events in order.
  function flush() {
    if (sending || queue.length === 0) return;
    const batch = queue;
    queue = [];
    sending = true;
    fetch('/events', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(batch),
    })
      .catch(function () {})
      .finally(function () { sending = false; });
  }

  window.addEventListener('error', function (e) {
    emit('page_error', { message: String(e.message) + ' at ' + e.filename + ':' + e.lineno });
  });
  window.addEventListener('unhandledrejection', function (e) {
    emit('page_error', { message: 'unhandled rejection: ' + String(e.reason) });
  });

  // The same digest as farm_tests::hls::digest (32-bit FNV-1a), so the harness's checker can tell
  // whether one segment URI was served with two different bodies.
  function fnv1a(buffer) {
    const bytes = new Uint8Array(buffer);
    let h = 0x811c9dc5;
    for (let i = 0; i < bytes.length; i++) {
      h ^= bytes[i];
      h = Math.imul(h, 0x01000193);
    }
    return h >>> 0;
  }

  // Segment bodies: hls.js hands a segment's buffer to its transmuxer worker before FRAG_LOADED
  // fires, so the digest is taken when hls.js first reads the XHR's response. This only observes:
  // the response hls.js gets is untouched.
  const digests = new Map();
  const xhrOpen = XMLHttpRequest.prototype.open;
  XMLHttpRequest.prototype.open = function (method, url) {
    this.__farmUrl = String(url);
    return xhrOpen.apply(this, arguments);
  };
  const responseGetter = Object.getOwnPropertyDescriptor(XMLHttpRequest.prototype, 'response').get;
  Object.defineProperty(XMLHttpRequest.prototype, 'response', {
    configurable: true,
    enumerable: true,
    get: function () {
      const value = responseGetter.call(this);
      if (value instanceof ArrayBuffer && this.readyState === 4 && !this.__farmDigested) {
        this.__farmDigested = true;
        digests.set(this.__farmUrl, { bytes: value.byteLength, digest: fnv1a(value) });
      }
      return value;
    },
  });

  function ranges(r) {
    const out = [];
    for (let i = 0; i < r.length; i++) out.push([r.start(i), r.end(i)]);
    return out;
  }

  const mse = window.MediaSource || window.ManagedMediaSource;
  emit('page', {
    user_agent: navigator.userAgent,
    hls_version: window.Hls ? Hls.version : null,
    hls_supported: window.Hls ? Hls.isSupported() : false,
    mse_h264_aac: mse ? mse.isTypeSupported('video/mp4; codecs="avc1.42E01E,mp4a.40.2"') : false,
    visibility: document.visibilityState,
    src: src,
  });

  // Presented frames, from the compositor: proof that pictures reached the screen.
  let frames = 0;
  if ('requestVideoFrameCallback' in video) {
    const onFrame = function (_now, meta) {
      frames += 1;
      if (frames === 1) emit('first_frame', { media_time: meta.mediaTime, current_time: video.currentTime });
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  ['loadedmetadata', 'loadeddata', 'canplay', 'play', 'playing', 'pause', 'waiting', 'stalled',
    'seeking', 'seeked', 'ended', 'emptied', 'error'].forEach(function (name) {
    video.addEventListener(name, function () {
      const data = { name: name, current_time: video.currentTime, ready_state: video.readyState };
      if (name === 'error' && video.error) {
        data.code = video.error.code;
        data.message = video.error.message;
      }
      emit('video', data);
    });
  });

  let hls = null;
  if (!src) {
    emit('page_error', { message: 'no ?src= stream URL' });
  } else if (!window.Hls || !Hls.isSupported()) {
    emit('page_error', { message: 'hls.js is not loaded or not supported here' });
  } else {
    hls = new Hls();
    const E = Hls.Events;
    hls.on(E.MANIFEST_PARSED, function (_e, data) {
      emit('manifest_parsed', { levels: data.levels.length });
      const p = video.play();
      if (p && p.catch) {
        p.catch(function (err) { emit('page_error', { message: 'play() rejected: ' + err }); });
      }
    });
    hls.on(E.LEVEL_LOADED, function (_e, data) {
      const d = data.details;
      const xhr = data.networkDetails;
      let text = null;
      try {
        if (xhr && typeof xhr.responseText === 'string') text = xhr.responseText;
      } catch (_) { /* not a text response */ }
      emit('level_loaded', {
        url: d.url,
        target_duration: d.targetduration,
        start_sn: d.startSN,
        end_sn: d.endSN,
        start_cc: d.startCC,
        end_cc: d.endCC,
        live: d.live,
        updated: d.updated,
        fragments: d.fragments.length,
        text: text,
      });
    });
    const frag = function (f) {
      return { sn: f.sn, cc: f.cc, start: f.start, duration: f.duration, uri: f.relurl, url: f.url };
    };
    hls.on(E.FRAG_LOADED, function (_e, data) {
      const out = frag(data.frag);
      const body = digests.get(data.frag.url);
      digests.delete(data.frag.url);
      if (body) {
        out.bytes = body.bytes;
        out.digest = body.digest;
      } else if (data.payload && data.payload.byteLength > 0) {
        out.bytes = data.payload.byteLength;
        out.digest = fnv1a(data.payload);
      }
      emit('frag_loaded', out);
    });
    hls.on(E.FRAG_BUFFERED, function (_e, data) { emit('frag_buffered', frag(data.frag)); });
    hls.on(E.FRAG_CHANGED, function (_e, data) { emit('frag_changed', frag(data.frag)); });
    hls.on(E.ERROR, function (_e, data) {
      const url = data.url || (data.frag && data.frag.url) || (data.context && data.context.url) || null;
      emit('hls_error', {
        type: data.type,
        details: data.details,
        fatal: !!data.fatal,
        code: data.response ? data.response.code : null,
        url: url,
        reason: data.reason || (data.error ? String(data.error.message || data.error) : null),
        sn: data.frag ? data.frag.sn : null,
      });
    });
    hls.loadSource(src);
    hls.attachMedia(video);
  }

  setInterval(function () {
    const q = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
    emit('sample', {
      current_time: video.currentTime,
      ready_state: video.readyState,
      paused: video.paused,
      ended: video.ended,
      seeking: video.seeking,
      buffered: ranges(video.buffered),
      frames: frames,
      decoded: q ? q.totalVideoFrames : null,
      dropped: q ? q.droppedVideoFrames : null,
      latency: hls && Number.isFinite(hls.latency) ? hls.latency : null,
    });
    flush();
  }, 200);
})();
