<?php
/*
 * Plugin Name: tpenv hello
 * Description: A must-use plugin you edit on the laptop: it marks every page the laptop serves.
 * Must-use: loaded from WPMU_PLUGIN_DIR without activation, so nothing in the shared database
 * changes and the cluster's WordPress (which does not have this file) is unaffected.
 */
add_action('send_headers', function () {
    header('X-Served-By: laptop');
});
add_action('wp_footer', function () {
    echo "<p id=\"tpenv-hello\">hello from the laptop v1</p>\n";
});
