<?php
/* WordPress configured from its environment, as the charts and the official image do. One file
 * for both sides: the pod's image installs it as /etc/wordpress/config-default.php (Debian's
 * wp-config.php loads it), run-local.sh as the laptop's wp-config; the pod gets the variables from
 * its Deployment (WORDPRESS_DB_PASSWORD from a Secret), the laptop the same ones from tpenv. */
function tpenv_env($name, $default = null) {
    $v = getenv($name);
    return ($v === false || $v === '') ? $default : $v;
}
define('DB_NAME', tpenv_env('WORDPRESS_DB_NAME', 'wordpress'));
define('DB_USER', tpenv_env('WORDPRESS_DB_USER', 'wordpress'));
define('DB_PASSWORD', tpenv_env('WORDPRESS_DB_PASSWORD', ''));
define('DB_HOST', tpenv_env('WORDPRESS_DB_HOST', 'localhost'));
// Where uploads, themes and plugins live: the wp-content volume (Debian's default path).
define('WP_CONTENT_DIR', tpenv_env('WORDPRESS_CONTENT_DIR', '/var/lib/wordpress/wp-content'));
// Must-use plugins (loaded without activation, nothing in the database): a laptop points this
// at its own directory, the pod keeps wp-content/mu-plugins.
if (tpenv_env('WORDPRESS_MU_PLUGIN_DIR')) {
    define('WPMU_PLUGIN_DIR', tpenv_env('WORDPRESS_MU_PLUGIN_DIR'));
}
// The site answers under whatever name it is asked by (Service name, port-forward, intercept):
// no redirect to the address it was installed under.
$tpenv_host = isset($_SERVER['HTTP_HOST']) ? $_SERVER['HTTP_HOST'] : 'localhost';
define('WP_HOME', 'http://' . $tpenv_host);
define('WP_SITEURL', 'http://' . $tpenv_host);
define('WP_CONTENT_URL', 'http://' . $tpenv_host . '/wp-content');
foreach (array('AUTH_KEY', 'SECURE_AUTH_KEY', 'LOGGED_IN_KEY', 'NONCE_KEY',
               'AUTH_SALT', 'SECURE_AUTH_SALT', 'LOGGED_IN_SALT', 'NONCE_SALT') as $k) {
    define($k, tpenv_env('WORDPRESS_' . $k, 'tpenv-example-' . $k));
}
define('WP_DEBUG', tpenv_env('WORDPRESS_DEBUG') === '1');
define('FS_METHOD', 'direct');
