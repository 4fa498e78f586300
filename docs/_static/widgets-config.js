// Loaded between require.js and the widget manager on pages with widget snapshots (see docs/conf.py).
// Everything the widget manager would fetch from a CDN, or from paths relative to the page, comes from this
// site's _static/ folder instead.
(function () {
  var me = document.currentScript && document.currentScript.src;
  var base = (me ? me.replace(/widgets-config\.js(\?.*)?$/, "") : "_static/") + "";
  var hm = base + "npm/html-manager/";
  // The widget manager's CSS refers to its fonts relative to the URL require.js gives each of its modules:
  // give them all URLs inside npm/html-manager/, where the fonts are.
  var paths = { anywidget: base + "anywidget/index" };  // anywidget's front end (AMD module from its wheel)
  ["base", "base7", "controls", "controls7", "html-manager"].forEach(function (m) { paths["@jupyter-widgets/" + m] = hm + m; });
  paths["@jupyter-widgets/html-manager/dist/libembed-amd"] = hm + "libembed-amd";
  window.__jupyter_widgets_assets_path__ = hm;
  if (window.requirejs) window.requirejs.config({ paths: paths });
})();
