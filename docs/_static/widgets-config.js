// Loaded between require.js and the widget manager on pages with widget snapshots (see docs/conf.py).
// Everything the widget manager would fetch from a CDN comes from this site's _static/ folder instead.
(function () {
  var me = document.currentScript && document.currentScript.src;
  var base = me ? me.replace(/widgets-config\.js(\?.*)?$/, "") : "_static/";
  // fonts (Font Awesome) that the widget manager's CSS refers to
  window.__jupyter_widgets_assets_path__ = base + "npm/html-manager/";
  // anywidget's front end (an AMD module from the anywidget wheel) for anywidget-based widgets
  if (window.requirejs) window.requirejs.config({ paths: { anywidget: base + "anywidget/index" } });
})();
